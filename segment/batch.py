"""Segment every scan of a folder, several at once, locally or on a dask.distributed cluster.

The steps, each a small function:

1. :func:`discover` (or :func:`discover_bids`) lists the scans, sorted, so runs are
   deterministic;
2. :func:`plan` gives each scan its outputs (input sub-folders mirrored, or BIDS-derivative
   names) and decides, from what is already on disk, whether it is ``skipped`` (complete and
   made with the same options, input and pipeline), to be run, or ``failed`` (outputs made with
   other options and no ``overwrite``; two inputs that would write the same outputs);
3. :func:`run_batch` submits one :func:`run_task` per scan to a Dask executor -- a
   ``distributed.LocalCluster`` of ``jobs`` processes by default, or any running cluster given by
   its ``tcp://`` address -- and collects results as they complete.  ``run_task`` never raises:
   a failing scan becomes a ``failed`` row, and no scan's failure stops another.

``batch_summary.tsv`` is rewritten (atomically) after every finished scan, so a killed batch
still leaves a valid summary of what finished.  Every output file is written under a temporary
name and renamed into place, and the JSON sidecar comes last, so a killed batch leaves no
half-written file: leftover ``.*.tmp-<pid>-*`` files of dead processes are removed by the next
run, which redoes the scans whose sidecar is missing.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import __version__, naming
from .exceptions import InputError, SegmentError
from .io import SUPPORTED_EXTENSIONS, atomic_write, is_supported, scan_stem

__all__ = [
    "SUMMARY_COLUMNS",
    "ScanTask",
    "BatchResult",
    "discover",
    "discover_bids",
    "plan",
    "run_task",
    "run_batch",
    "clean_stale_temporaries",
    "read_summary",
]

#: Columns of ``batch_summary.tsv``.
SUMMARY_COLUMNS = ("input", "status", "error", "K", "iterations", "converged", "log_likelihood",
                   "seconds", "dseg", "warnings")  # fmt: skip
SUMMARY_NAME = "batch_summary.tsv"
_NIFTI = (".nii", ".nii.gz")
#: How long to wait for a ``tcp://`` scheduler to answer.
CONNECT_TIMEOUT = "10s"
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}")


@dataclass
class ScanTask:
    """One scan of a batch: where it is, where its outputs go and how to make them.

    Attributes
    ----------
    input : Path
        Absolute path of the scan.
    rel : str
        Its path relative to the input folder (POSIX), as shown in the summary.
    paths : OutputPaths
        Its outputs.
    settings : dict
        Final settings (model options, ``mask``, ``probseg``, ``qc``).
    em_options : dict
        Keyword options for :func:`segment.api.segment_file` (model + in-scan scheduler).
    extra : dict
        Added to the JSON sidecar: pipeline, final options and their sources, input stat.
    overwrite : bool
        Replace existing (incomplete or other-options) outputs.
    label_map : dict or None
        ``LabelMap`` of the BIDS ``_probseg.json``; ``None`` outside BIDS mode.
    """

    input: Path
    rel: str
    paths: naming.OutputPaths
    settings: dict[str, Any]
    em_options: dict[str, Any]
    extra: dict[str, Any]
    overwrite: bool = False
    label_map: dict[str, str] | None = None


@dataclass
class BatchResult:
    """Rows of the summary (one per scan, input order) and where it was written."""

    rows: list[dict[str, Any]]
    summary: Path
    output_root: Path
    n_failed: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_failed = sum(row["status"] == "failed" for row in self.rows)


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
def discover(
    input_dir: str | Path,
    patterns: Sequence[str] = (),
    *,
    recursive: bool = False,
    exclude: Iterable[Path] = (),
) -> list[Path]:
    """Scans in ``input_dir``, sorted by relative path.

    Parameters
    ----------
    input_dir : path
    patterns : list of str
        Shell patterns matched case-insensitively against the file name, or, when the
        pattern holds a ``/``, against the end of the path relative to ``input_dir``
        (:meth:`pathlib.PurePath.match`: ``site1/*`` matches ``site1/x.nii`` only).
        Default: every supported type (:data:`segment.io.SUPPORTED_EXTENSIONS`).
    recursive : bool
        Look in sub-folders too.  Hidden files and folders are always left out.
    exclude : paths
        Folders to leave out (e.g. the output folder when it is inside ``input_dir``).
    """
    root = Path(input_dir)
    excluded = {Path(p).resolve() for p in exclude}
    found = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (here / d).resolve() not in excluded)  # fmt: skip
        if not recursive:
            dirs.clear()
        for name in files:
            rel = (here / name).relative_to(root).as_posix()
            if not name.startswith(".") and _matches(name, rel, patterns):
                found.append(here / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _matches(name: str, rel: str, patterns: Sequence[str]) -> bool:
    if not patterns:
        return is_supported(name)
    for pattern in (p.lower() for p in patterns):
        if "/" in pattern:  # path pattern: "*" stays within one folder, as in the shell
            if PurePosixPath(rel.lower()).match(pattern):
                return True
        elif fnmatch.fnmatchcase(name.lower(), pattern):
            return True
    return False


def discover_bids(
    bids_dir: str | Path,
    *,
    subjects: Sequence[str] = (),
    sessions: Sequence[str] = (),
    suffixes: Sequence[str] = (),
) -> list[Path]:
    """Anatomical NIfTI scans of a BIDS dataset (``sub-*/[ses-*/]anat/*.nii[.gz]``).

    ``subjects``/``sessions`` are labels with or without the ``sub-``/``ses-`` prefix;
    ``suffixes`` are e.g. ``T1w``.  Empty filters keep everything.
    """
    root = Path(bids_dir)
    if not (root / "dataset_description.json").is_file():
        raise InputError(root, "not a BIDS dataset (no dataset_description.json); drop --bids")
    keep_sub = {s.removeprefix("sub-") for s in subjects}
    keep_ses = {s.removeprefix("ses-") for s in sessions}
    found = []
    for path in sorted([*root.glob("sub-*/anat/*"), *root.glob("sub-*/ses-*/anat/*")]):
        if path.name.startswith(".") or not path.name.lower().endswith(_NIFTI):
            continue
        try:
            entities = naming.parse_bids_entities(path)
        except ValueError:
            continue
        if ((keep_sub and entities["sub"] not in keep_sub)
                or (keep_ses and entities.get("ses") not in keep_ses)
                or (suffixes and entities["suffix"] not in suffixes)):  # fmt: skip
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# --------------------------------------------------------------------------------------------
# planning and resume
# --------------------------------------------------------------------------------------------
def plan(
    scans: Sequence[Path],
    input_dir: Path,
    output_root: Path,
    *,
    settings: dict[str, Any],
    extra: dict[str, Any],
    em_options: dict[str, Any],
    bids: bool = False,
    desc: str | None = None,
    class_names: Sequence[str] = (),
    resume: bool = True,
    overwrite: bool = False,
) -> tuple[list[ScanTask], dict[str, dict[str, Any]]]:
    """Tasks to run, and the rows already decided (``skipped``, or ``failed`` before running).

    A scan is complete when its sidecar and every other expected output exist and the sidecar
    records the same final options, pipeline and input (SHA-256, or the same size and
    modification time).  Complete scans are skipped (``resume``); with ``overwrite`` every scan
    is redone.  Outputs of a killed run (no sidecar) are redone when resuming; outputs made
    with other options are only replaced with ``overwrite``.
    """
    tasks, decided, owners = [], {}, {}
    for scan in scans:
        rel = scan.relative_to(input_dir).as_posix()
        paths = _output_paths(scan, rel, output_root, bids, desc)
        if paths.sidecar in owners:
            decided[rel] = _row(rel, "failed", error=(
                f"{scan}: writes the same outputs as {owners[paths.sidecar]}; rename one of them "
                "or use --pattern to choose"))  # fmt: skip
            continue
        owners[paths.sidecar] = rel
        task_extra = {**extra, "input_stat": _stat(scan)}
        label_map = None
        if bids:
            task_extra["Sources"] = [f"bids:raw:{rel}"]
            label_map = {str(k): name for k, name in enumerate(class_names)}
        task = ScanTask(scan, rel, paths, settings, em_options, task_extra, overwrite, label_map)
        state, detail = ("redo", "") if overwrite else _existing_state(task)
        if state == "complete" and resume:
            decided[rel] = _row(rel, "skipped", **detail)
        elif state in ("complete", "different") and not overwrite:
            why = "exist" if state == "complete" else f"exist and were made with {detail}"
            keep = "" if resume or state == "different" else " or --resume to keep them"
            error = f"{paths.sidecar}: outputs {why}; pass --overwrite to redo them{keep}"
            decided[rel] = _row(rel, "failed", error=error)
        else:
            task.overwrite = overwrite or (resume and state == "incomplete")
            tasks.append(task)
    return tasks, decided


def _output_paths(scan: Path, rel: str, root: Path, bids: bool, desc: str | None):
    if bids:
        return naming.bids_output_paths(rel, root, desc=desc)
    kind = "nifti" if scan.name.lower().endswith(_NIFTI) else "image"
    return naming.plain_output_paths(scan, root / Path(rel).parent, kind=kind)


def _stat(path: Path) -> dict[str, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _expected(task: ScanTask) -> list[Path]:
    paths = task.paths
    wanted = [paths.dseg, paths.sidecar]
    wanted += [paths.probseg] * task.settings["probseg"] + [paths.qc] * task.settings["qc"]
    if task.label_map is not None and task.settings["probseg"]:
        wanted.append(paths.probseg_sidecar)
    return wanted


def _existing_state(task: ScanTask) -> tuple[str, Any]:
    """``("missing"|"incomplete"|"complete"|"different", detail)`` of a scan's outputs."""
    expected = _expected(task)
    if not task.paths.sidecar.exists():
        return ("incomplete" if any(p.exists() for p in expected) else "missing"), ""
    try:
        record = json.loads(task.paths.sidecar.read_text())
    except (OSError, ValueError):
        return "incomplete", ""
    if not all(p.exists() for p in expected):
        return "incomplete", ""
    old = json.loads(json.dumps(record.get("final_options")))
    new = json.loads(json.dumps(task.extra["final_options"]))
    if old != new:
        if not isinstance(old, dict):
            return "different", "options that were not recorded"
        changed = [f"{k}={old.get(k)!r}, now {v!r}" for k, v in new.items() if old.get(k) != v]
        return "different", "other options (" + "; ".join(changed) + ")"
    old_pipeline = (record.get("pipeline") or {}).get("sha256")
    new_pipeline = (task.extra.get("pipeline") or {}).get("sha256")
    if old_pipeline != new_pipeline:
        return "different", "another pipeline file"
    if not _same_input(task.input, record):
        return "different", f"another version of the input {task.input.name}"
    model = record.get("model", {})
    return "complete", {"K": model.get("n_components"), "iterations": model.get("n_iter"),
                        "converged": model.get("converged"),
                        "log_likelihood": model.get("log_likelihood")}  # fmt: skip


def _same_input(path: Path, record: dict) -> bool:
    if record.get("input_stat") and record["input_stat"] == _stat(path):
        return True  # same size and modification time: no need to hash again
    from .sidecar import file_sha256

    inputs = record.get("inputs") or [{}]
    try:
        return inputs[0].get("sha256") == file_sha256(path)
    except OSError:
        return False


def clean_stale_temporaries(root: str | Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-<token>`` files left under ``root`` by dead processes.

    Only files whose writer process no longer runs on this machine are removed, so a batch
    writing into the same folder is left alone.
    """
    removed = []
    for folder, _, files in os.walk(root):
        for name in files:
            match = _TEMPORARY.match(name)
            if match and not _pid_alive(int(match[1])):
                path = Path(folder) / name
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return pid < 2**22  # exists but not ours, or an impossible pid
    return True


# --------------------------------------------------------------------------------------------
# one scan (runs on a worker; never raises)
# --------------------------------------------------------------------------------------------
def run_task(task: ScanTask) -> dict[str, Any]:
    """Segment one scan and write its outputs; return its summary row (``ok`` or ``failed``)."""
    from .api import segment_file

    start = time.perf_counter()
    settings = task.settings
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if task.label_map is not None and settings["probseg"]:
                _write_probseg_json(task)
            if settings["qc"]:  # BIDS puts the QC picture in another folder (figures/)
                task.paths.qc.parent.mkdir(parents=True, exist_ok=True)
            result = segment_file(
                task.input, task.paths.sidecar.parent, output_paths=task.paths,
                mask=None if settings["mask"] == "none" else settings["mask"],
                overwrite=task.overwrite, probseg=settings["probseg"], qc=settings["qc"],
                command_line=task.extra.get("command_line"), extra=task.extra,
                **task.em_options,
            )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - one failing scan must not stop the batch
        message = str(error) if isinstance(error, SegmentError | OSError) \
            else f"{type(error).__name__}: {error}"  # fmt: skip
        _discard_extras(task)
        return _row(task.rel, "failed", error=message, seconds=time.perf_counter() - start)
    estimator = result.estimator
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    return _row(
        task.rel, "ok", K=estimator.n_components, iterations=estimator.n_iter_,
        converged=bool(estimator.converged_), log_likelihood=float(estimator.log_likelihood_),
        seconds=time.perf_counter() - start, warnings="; ".join(notes),
        dseg=str(task.paths.dseg),
    )  # fmt: skip


def _discard_extras(task: ScanTask) -> None:
    """After a failure, remove what :func:`run_task` added beside ``segment_file``'s outputs."""
    if task.label_map is not None and not task.paths.probseg.exists():
        with contextlib.suppress(OSError):
            task.paths.probseg_sidecar.unlink()
    with contextlib.suppress(OSError):
        task.paths.qc.parent.rmdir()  # only if empty


def _write_probseg_json(task: ScanTask) -> None:
    record = {
        "LabelMap": task.label_map,
        "Sources": task.extra.get("Sources", []),
        "Description": "volume k of the 4th axis: probability of label k+1 of the _dseg",
    }
    target = task.paths.probseg_sidecar
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def _row(rel: str, status: str, **values: Any) -> dict[str, Any]:
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(input=rel, status=status)
    row.update({k: v for k, v in values.items() if v is not None})
    row["error"] = " ".join(str(row["error"]).split())
    row["warnings"] = " ".join(str(row["warnings"]).split())
    return row


# --------------------------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------------------------
def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6f}" if abs(value) < 1e6 else f"{value:.10g}"
    return str(value)


def write_summary(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``batch_summary.tsv`` atomically (tab-separated, one row per scan)."""
    lines = ["\t".join(SUMMARY_COLUMNS)]
    lines += ["\t".join(_format(row[c]) for c in SUMMARY_COLUMNS) for row in rows]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def read_summary(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``batch_summary.tsv`` as dictionaries of strings."""
    header, *lines = Path(path).read_text().splitlines()
    names = header.split("\t")
    return [dict(zip(names, line.split("\t"))) for line in lines]


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def run_batch(
    input_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    patterns: Sequence[str] = (),
    recursive: bool = False,
    bids: bool = False,
    subjects: Sequence[str] = (),
    sessions: Sequence[str] = (),
    suffixes: Sequence[str] = (),
    pipeline=None,
    settings: dict[str, Any] | None = None,
    sources: dict[str, str] | None = None,
    jobs: int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    resume: bool = True,
    overwrite: bool = False,
    on_result: Callable[[dict[str, Any], int, int], None] | None = None,
    command_line: Sequence[str] | None = None,
    memory_limit: int | str | None = None,
    compresslevel: int | None = None,
) -> BatchResult:
    """Segment every scan found in ``input_dir``; see the module docstring.

    Parameters
    ----------
    input_dir, output_dir : path
        Scans are read from ``input_dir``; outputs mirror its sub-folders in ``output_dir``.
        With ``bids``, outputs go to ``<output_dir>/derivatives/segment`` (``output_dir``
        defaults to ``input_dir``).
    patterns, recursive : see :func:`discover`.
    bids, subjects, sessions, suffixes : BIDS mode and its filters, see :func:`discover_bids`.
    pipeline : Pipeline, optional
        Recorded in the sidecars; BIDS names get ``_desc-<pipeline name>``.
    settings, sources : dict
        Final settings and where each came from (:func:`segment.pipelines.resolve_options`).
    jobs : int, optional
        Scans at once on the local cluster (default: CPU count, at most the scans to do).
    scheduler : {None, "processes", "threads", "synchronous"} or address
        Local processes (default), local threads, one at a time in this process, or a running
        ``dask.distributed`` scheduler (``tcp://host:8786``) whose workers can read the files.
    workers : int, optional
        Threads for each scan's EM (default: 1, the scans themselves run in parallel).
    resume, overwrite : bool
        Skip complete scans made with the same options; redo everything.
    on_result : callable, optional
        ``on_result(row, n_done, n_total)`` after each scan (skipped ones first).
    memory_limit : int or str, optional
        Per scan, as for :func:`segment.api.segment_file` (default 3 GB). It does not change the
        results, so it is not compared when resuming.
    compresslevel : int, optional
        gzip level of the ``.nii.gz`` outputs (default 1), as for
        :func:`segment.api.segment_file`; not compared when resuming either.

    Returns
    -------
    BatchResult
    """
    from .api import (
        _check_compresslevel,
        _memory_budget,
        check_out_dir_creatable,
        make_estimator,
    )
    from .pipelines import DEFAULT_SETTINGS, class_names

    input_dir = Path(input_dir).absolute()
    if not input_dir.is_dir():
        raise InputError(input_dir, "input folder not found")
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    model = {k: settings[k] for k in ("n_components", "max_iter", "tol", "variance_floor",
                                      "seed", "chunk_size", "mrf_beta", "bias_field",
                                      "bias_smoothness")}  # fmt: skip
    em_options = {**model, "scheduler": "threads" if workers and workers > 1 else "synchronous",
                  "workers": workers}  # fmt: skip
    make_estimator(em_options)  # option errors before any scan is touched
    _memory_budget(memory_limit)
    em_options["memory_limit"] = memory_limit
    if compresslevel is not None:
        em_options["compresslevel"] = _check_compresslevel(compresslevel)
    root = Path(output_dir or input_dir).absolute()
    output_root = root / "derivatives" / "segment" if bids else root
    check_out_dir_creatable(output_root)
    if bids:
        scans = discover_bids(input_dir, subjects=subjects, sessions=sessions, suffixes=suffixes)
    else:
        scans = discover(input_dir, patterns, recursive=recursive, exclude=[output_root])
    if not scans:
        what = "anatomical NIfTI scans" if bids else (
            f"files matching {', '.join(patterns)}" if patterns else
            f"scans ({', '.join(SUPPORTED_EXTENSIONS)})")  # fmt: skip
        raise InputError(
            input_dir,
            f"no {what} found" + ("" if recursive or bids else "; add --recursive for sub-folders"),
        )
    extra = {"pipeline": pipeline.record() if pipeline else None, "final_options": settings,
             "option_sources": sources or {},
             "command_line": list(command_line) if command_line else None}  # fmt: skip
    names = class_names(pipeline, settings["n_components"])
    tasks, decided = plan(
        scans, input_dir, output_root, settings=settings, extra=extra, em_options=em_options,
        bids=bids, desc=pipeline.name if pipeline else None, class_names=names,
        resume=resume, overwrite=overwrite,
    )  # fmt: skip
    output_root.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(output_root)
    if bids:
        _write_derivative_files(output_root, pipeline, names)
    order = [s.relative_to(input_dir).as_posix() for s in scans]
    rows: dict[str, dict[str, Any]] = {}
    summary = output_root / SUMMARY_NAME

    def record(row: dict[str, Any]) -> None:
        rows[row["input"]] = row
        write_summary(summary, (rows[r] for r in order if r in rows))
        if on_result is not None:
            on_result(row, len(rows), len(order))

    write_summary(summary, [])  # valid from the start, even if the batch is killed
    for rel in order:
        if rel in decided:
            record(decided[rel])
    for row in _execute(tasks, scheduler=scheduler, jobs=jobs):
        record(row)
    return BatchResult([rows[r] for r in order], summary, output_root)


def _write_derivative_files(root: Path, pipeline, names: Sequence[str]) -> None:
    description = naming.derivative_description(
        __version__, pipeline=pipeline.name if pipeline else None
    )
    with atomic_write(root / "dataset_description.json") as tmp:
        tmp.write_text(json.dumps(description, indent=2) + "\n")
    with atomic_write(root / "dseg.tsv") as tmp:
        tmp.write_text(naming.dseg_tsv(list(names)))


def _execute(tasks: list[ScanTask], *, scheduler: str | None, jobs: int | None):
    """Yield the row of each task as it completes, on the chosen executor."""
    if not tasks:
        return
    if scheduler == "synchronous":
        for task in tasks:
            yield run_task(task)
        return
    from distributed import as_completed

    with _client(scheduler, jobs or min(os.cpu_count() or 1, len(tasks))) as client:
        futures = {
            client.submit(
                run_task, task, pure=False, key=f"segment-{i}-{scan_stem(task.input)}"
            ): task
            for i, task in enumerate(tasks)
        }
        for future in as_completed(futures, loop=client.loop):
            task = futures.pop(future)
            try:
                row = future.result()
            except Exception as error:  # noqa: BLE001 - e.g. a worker killed (out of memory)
                row = _row(task.rel, "failed", error=f"{type(error).__name__}: {error} "
                           "(the worker running this scan died; out of memory?)")  # fmt: skip
            future.release()
            yield row


class _client:
    """Context manager: a Client on a new LocalCluster, or connected to an address."""

    def __init__(self, scheduler: str | None, jobs: int):
        self.scheduler, self.jobs = scheduler, jobs
        self.cluster = self.client = None

    def __enter__(self):
        import logging

        from distributed import Client, LocalCluster

        if self.scheduler and "://" in self.scheduler:
            try:
                self.client = Client(self.scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False)
            except OSError as error:
                raise SegmentError(
                    f"cannot connect to the dask scheduler at {self.scheduler}: {error}; start "
                    "one with `dask scheduler` and workers with `dask worker "
                    f"{self.scheduler}`, or leave out --scheduler to run locally"
                ) from None
            return self.client
        self.cluster = LocalCluster(
            n_workers=1 if self.scheduler == "threads" else self.jobs,
            threads_per_worker=self.jobs if self.scheduler == "threads" else 1,
            processes=self.scheduler != "threads", dashboard_address=None,
            silence_logs=logging.ERROR,
        )  # fmt: skip
        self.client = Client(self.cluster, set_as_default=False)
        return self.client

    def __exit__(self, *exc_info):
        for resource in (self.client, self.cluster):
            if resource is not None:
                try:
                    resource.close()
                except Exception:  # noqa: BLE001, S110 - closing is best effort
                    pass
        return False
