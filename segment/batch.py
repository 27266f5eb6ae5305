"""Segment every scan of a folder, several at once, locally or on a dask.distributed cluster.

The steps, each a small function:

1. :func:`discover` (or :func:`discover_bids`) lists the scans, sorted, so runs are
   deterministic;
2. :func:`plan` gives each scan its outputs (input sub-folders mirrored, or BIDS-derivative
   names) and decides, from what is already on disk, whether it is ``skipped`` (complete and
   made with the same options, input and pipeline), to be run, or ``failed`` (outputs made with
   other options and no ``overwrite``; two inputs that would write the same outputs;
   a scan whose own mask cannot be found);
3. :func:`run_batch` submits one :func:`run_task` per scan to a Dask executor -- a
   ``distributed.LocalCluster`` of ``jobs`` processes by default, or any running cluster given by
   its ``tcp://`` address -- and collects results as they complete.  ``run_task`` never raises:
   a failing scan becomes a ``failed`` row, and no scan's failure stops another.

Each scan may have its own mask (:class:`MaskSpec`): a template such as
``{stem}_brainmask.nii.gz``, or in BIDS mode (``bids``) the brain mask a preprocessing
pipeline left in the dataset's derivatives (:func:`find_bids_mask`).  A file used as another
scan's mask is not itself segmented.

``batch_summary.tsv`` is rewritten (atomically) after every finished scan, so a killed batch
still leaves a valid summary of what finished.  Every output file is written under a temporary
name and renamed into place, and the JSON sidecar comes last, so a killed batch leaves no
half-written file: leftover ``.*.tmp-<pid>-*`` files of dead processes are removed by the next
run, which redoes the scans whose sidecar is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, naming
from ._validation import check_k_range
from .discovery import check_bids_app, discover, discover_bids
from .exceptions import InputError, SegmentError
from .io import SUPPORTED_EXTENSIONS, atomic_write, kill_point, scan_stem
from .resume import ScanTask, clean_stale_temporaries, plan
from .scan_masks import MASK_PLACEHOLDERS, MaskSpec, find_bids_mask, leave_out_masks
from .summary import (  # noqa: F401 - escape_tsv, unescape_tsv: as before the split
    SUMMARY_COLUMNS,
    SUMMARY_NAME,
    escape_tsv,
    read_summary,
    row,
    unescape_tsv,
    write_summary,
)

__all__ = [
    "SUMMARY_COLUMNS",
    "MASK_PLACEHOLDERS",
    "ScanTask",
    "BatchResult",
    "MaskSpec",
    "discover",
    "discover_bids",
    "check_bids_app",
    "find_bids_mask",
    "plan",
    "run_task",
    "run_batch",
    "clean_stale_temporaries",
    "read_summary",
]


CONNECT_TIMEOUT = "10s"


@dataclass
class BatchResult:
    """Rows of the summary (one per scan, input order) and where it was written."""

    rows: list[dict[str, Any]]
    summary: Path
    output_root: Path
    n_failed: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_failed = sum(row["status"] == "failed" for row in self.rows)


# one scan (runs on a worker; never raises)
# --------------------------------------------------------------------------------------------
def run_task(task: ScanTask) -> dict[str, Any]:
    """Segment one scan and write its outputs; return its summary row (``ok`` or ``failed``)."""
    from .api import segment_file

    start = time.perf_counter()
    settings = task.settings
    mask = str(settings["mask"] if task.mask is None else task.mask)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # with -k auto the names of the probability volumes are known after the fit
            auto_k = check_k_range(settings["n_components"]) is not None
            if task.label_map is not None and settings["probseg"] and not auto_k:
                _write_probseg_json(task)
            if settings["qc"]:  # BIDS puts the QC picture in another folder (figures/)
                task.paths.qc.parent.mkdir(parents=True, exist_ok=True)
            result = segment_file(
                task.input, task.paths.sidecar.parent, output_paths=task.paths,
                mask=None if mask.lower() == "none" else mask,
                overwrite=task.overwrite, probseg=settings["probseg"], qc=settings["qc"],
                qc_histogram=settings.get("qc_histogram", "linear"),
                command_line=task.extra.get("command_line"), extra=_hash_mask(task.extra),
                class_names=task.class_names(), **task.em_options,
            )  # fmt: skip
            if task.label_map is not None and settings["probseg"] and auto_k:
                names = naming.label_names(None, result.estimator.n_components)
                _write_probseg_json(task, dict(enumerate(names)))
    except Exception as error:  # noqa: BLE001 - one failing scan must not stop the batch
        message = str(error) if isinstance(error, SegmentError | OSError) \
            else f"{type(error).__name__}: {error}"  # fmt: skip
        _discard_extras(task)
        return row(task.rel, "failed", error=message, seconds=time.perf_counter() - start)
    estimator = result.estimator
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)})
    return row(
        task.rel, "ok", K=estimator.n_components, iterations=estimator.n_iter_,
        converged=bool(estimator.converged_), log_likelihood=float(estimator.log_likelihood_),
        seconds=time.perf_counter() - start, warnings="; ".join(notes),
        dseg=str(task.paths.dseg), **_volume_columns(result),
    )  # fmt: skip


def _volume_columns(result) -> dict[str, Any]:
    """``volume_estimate`` and ``volume_ml_<k>`` of each label for the summary (mL, 0.001)."""
    from .sidecar import round_ml

    fractions = result.fraction_volumes()
    if fractions is None:
        volumes, estimate = result.soft_counts * result.voxel_volume_ml, "posteriors"
    else:
        volumes, estimate = fractions, "fractions"
    return {"volume_estimate": estimate,
            **{f"volume_ml_{k}": round_ml(v) for k, v in enumerate(volumes, start=1)}}  # fmt: skip


def _hash_mask(extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` with the SHA-256 of the mask file, so that resume can check its content."""
    record = extra.get("mask_file")
    if not record:
        return extra
    from .sidecar import file_sha256

    try:
        return {**extra, "mask_file": {**record, "sha256": file_sha256(record["path"])}}
    except OSError:  # gone or unreadable: segment_file says so, naming the file
        return extra


def _discard_extras(task: ScanTask) -> None:
    """After a failure, remove what :func:`run_task` added beside ``segment_file``'s outputs."""
    if task.label_map is not None and not task.paths.probseg.exists():
        with contextlib.suppress(OSError):
            task.paths.probseg_sidecar.unlink()
    with contextlib.suppress(OSError):
        task.paths.qc.parent.rmdir()  # only if empty


def _write_probseg_json(task: ScanTask, label_map: dict | None = None) -> None:
    """The BIDS ``_probseg.json``: the class of each volume (default: the task's ``label_map``)."""
    label_map = task.label_map if label_map is None else {str(k): v for k, v in label_map.items()}
    record = {
        "LabelMap": label_map,
        "Sources": task.extra.get("Sources", []),
        "Description": "volume k of the 4th axis: probability of label k+1 of the _dseg",
    }
    target = task.paths.probseg_sidecar
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


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
    mask: str | Path | None = None,
    jobs: int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    resume: bool = True,
    overwrite: bool = False,
    on_result: Callable[[dict[str, Any], int, int], None] | None = None,
    command_line: Sequence[str] | None = None,
    memory_limit: int | str | None = None,
    compresslevel: int | None = None,
    derivative_dir: str | Path | None = None,
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
    mask : str or Path, optional
        Replaces ``settings["mask"]`` (default ``"none"``): ``"none"``, ``"auto"``, one mask
        file for every scan, a template giving each scan its own mask
        (``"{stem}_brainmask.nii.gz"``, ``"/data/masks/{rel}/{stem}_mask.nii.gz"``), or with
        ``bids`` ``"bids"``: each scan's brain mask in the dataset's derivatives.  See
        :class:`MaskSpec` and :func:`find_bids_mask`.  A scan whose mask is missing, unreadable
        or on another grid fails alone; files used as a mask are not segmented as scans.
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
    derivative_dir : path, optional
        With ``bids``: the derivative dataset's own folder, used as it is (the BIDS-Apps
        ``output_dir``, see :func:`check_bids_app`), instead of
        ``<output_dir>/derivatives/segment``.

    Returns
    -------
    BatchResult

    Raises
    ------
    SegmentError
        Bad options, among them a malformed mask template (before any scan is read).
    """
    from ._options import DEFAULT_OPTIONS
    from ._validation import check_compresslevel, check_out_dir_creatable, memory_budget
    from .api import make_estimator
    from .pipelines import DEFAULT_SETTINGS

    input_dir = Path(input_dir).absolute()
    if not input_dir.is_dir():
        raise InputError(input_dir, "input folder not found")
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    if mask is not None:
        settings["mask"] = str(mask)
    mask_spec = MaskSpec.parse(settings["mask"], bids=bids)
    model = {k: settings[k] for k in DEFAULT_OPTIONS if k in settings}  # not where it runs
    em_options = {**model, "scheduler": "threads" if workers and workers > 1 else "synchronous",
                  "workers": workers}  # fmt: skip
    make_estimator(em_options)  # option errors before any scan is touched
    memory_budget(memory_limit)
    em_options["memory_limit"] = memory_limit
    if compresslevel is not None:
        em_options["compresslevel"] = check_compresslevel(compresslevel)
    root = Path(output_dir or input_dir).absolute()
    output_root = root / "derivatives" / "segment" if bids else root
    if bids and derivative_dir is not None:
        output_root = Path(derivative_dir).absolute()
    check_out_dir_creatable(output_root)
    if bids:
        scans = discover_bids(input_dir, subjects=subjects, sessions=sessions, suffixes=suffixes)
    else:
        scans = discover(input_dir, patterns, recursive=recursive, exclude=[output_root])
    masks: dict[Path, str | SegmentError] = {}
    for scan in scans:
        try:
            masks[scan] = mask_spec.for_scan(scan, input_dir, exclude=[output_root])
        except SegmentError as error:
            masks[scan] = error
    scans = leave_out_masks(scans, masks)
    if not scans:
        what = "anatomical NIfTI scans" if bids else (
            f"files matching {', '.join(patterns)}" if patterns else
            f"scans ({', '.join(SUPPORTED_EXTENSIONS)})")  # fmt: skip
        raise InputError(
            input_dir,
            f"no {what} found" + ("" if recursive or bids else "; add --recursive for sub-folders"),
        )
    output_root.mkdir(parents=True, exist_ok=True)
    with batch_lock(output_root):  # one batch per output folder
        return _run_locked(
            scans, masks, input_dir, output_root, settings=settings, sources=sources,
            pipeline=pipeline, command_line=command_line, em_options=em_options, bids=bids,
            resume=resume, overwrite=overwrite, scheduler=scheduler, jobs=jobs,
            on_result=on_result,
        )  # fmt: skip


def _run_locked(
    scans, masks, input_dir, output_root, *, settings, sources, pipeline, command_line,
    em_options, bids, resume, overwrite, scheduler, jobs, on_result,
) -> BatchResult:  # fmt: skip
    """The part of :func:`run_batch` that reads and writes the output folder (locked)."""
    from .pipelines import class_names

    extra = {"pipeline": pipeline.record() if pipeline else None, "final_options": settings,
             "option_sources": sources or {},
             "command_line": list(command_line) if command_line else None}  # fmt: skip
    k_values = check_k_range(settings["n_components"])  # -k auto: K is chosen for each scan
    names = class_names(pipeline, settings["n_components"] if k_values is None else k_values[-1])
    tasks, decided = plan(
        scans, input_dir, output_root, settings=settings, extra=extra, em_options=em_options,
        bids=bids, desc=pipeline.name if pipeline else None,
        class_names=names if k_values is None else (),
        resume=resume, overwrite=overwrite, masks=masks,
    )  # fmt: skip
    clean_stale_temporaries(output_root)
    if bids:
        _write_derivative_files(output_root, pipeline, names, input_dir)
    order = [s.relative_to(input_dir).as_posix() for s in scans]
    rows: dict[str, dict[str, Any]] = {}
    summary = output_root / SUMMARY_NAME

    def record(row: dict[str, Any]) -> None:
        rows[row["input"]] = row
        write_summary(summary, (rows[r] for r in order if r in rows))
        kill_point(f"summary-{len(rows)}")
        if on_result is not None:
            on_result(row, len(rows), len(order))

    write_summary(summary, [])  # valid from the start, even if the batch is killed
    for rel in order:
        if rel in decided:
            record(decided[rel])
    try:
        for row in _execute(tasks, scheduler=scheduler, jobs=jobs):
            record(row)
    finally:
        clean_stale_temporaries(output_root)  # e.g. of a worker killed in the middle of a scan
    return BatchResult([rows[r] for r in order], summary, output_root)


#: The lock file of an output folder (see :func:`batch_lock`).
LOCK_NAME = ".segment-batch.lock"


@contextlib.contextmanager
def batch_lock(output_root: Path):
    """Hold the advisory lock of ``output_root`` for one batch, or refuse at once.

    The lock is an exclusive ``flock`` on ``output_root/.segment-batch.lock``, which records
    who holds it (pid, host, start time) for the message of a second batch. The kernel
    releases it when the batch ends, however it ends (``kill -9`` included), so a stale lock
    never blocks a rerun.

    Raises
    ------
    SegmentError
        Another batch is writing into ``output_root``.
    """
    import fcntl
    import socket

    path = Path(output_root) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise SegmentError(
                f"{output_root}: another segment batch ({holder}) is writing into this folder; "
                "wait for it to finish or give another --out-dir"
            ) from None
        except OSError:  # no flock on this file system: run unlocked
            pass
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # still locked: nobody reads a stale holder
    finally:
        os.close(fd)


def _write_derivative_files(root: Path, pipeline, names: Sequence[str], raw: Path) -> None:
    """``dataset_description.json``, ``dseg.tsv`` and ``.bidsignore`` of the derivative."""
    try:
        raw_description = json.loads((raw / "dataset_description.json").read_text())
    except (OSError, ValueError):
        raw_description = {}
    description = naming.derivative_description(
        __version__, source=naming.relative_link(raw, root),
        pipeline=pipeline.name if pipeline else None,
        source_description=raw_description if isinstance(raw_description, dict) else {},
    )  # fmt: skip
    with atomic_write(root / "dataset_description.json") as tmp:
        tmp.write_text(json.dumps(description, indent=2) + "\n")
    with atomic_write(root / "dseg.tsv") as tmp:
        tmp.write_text(naming.dseg_tsv(list(names)))
    with atomic_write(root / ".bidsignore") as tmp:
        tmp.write_text(naming.BIDSIGNORE)


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
        total, done = len(futures), 0
        for future in as_completed(futures, loop=client.loop):
            task = futures.pop(future)
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001 - e.g. a worker killed (out of memory)
                if _scheduler_lost(client, error):
                    raise SegmentError(
                        f"lost the connection to the dask scheduler {scheduler or ''} after "
                        f"{done} of {total} scans; the summary lists the finished ones, the "
                        "others have no sidecar (incomplete, never half-written): rerun the "
                        "same command to finish the batch"
                    ) from None
                result = row(task.rel, "failed", error=f"{type(error).__name__}: {error} "
                              "(raised outside the scan's own error handling: the worker "
                              "died, out of memory?, or its environment is broken)")  # fmt: skip
            future.release()
            done += 1
            yield result


def _scheduler_lost(client, error: BaseException) -> bool:
    """Whether ``error`` of a future means the client lost its scheduler (not a scan's fault)."""
    import asyncio

    text = str(error)
    return (
        "scheduler-connection-lost" in text
        or "lost the connection to the scheduler" in text
        or (isinstance(error, asyncio.CancelledError) and client.status != "running")
    )


class _client:
    """Context manager: a Client on a new LocalCluster, or connected to an address."""

    def __init__(self, scheduler: str | None, jobs: int):
        self.scheduler, self.jobs = scheduler, jobs
        self.cluster = self.client = None

    def __enter__(self):
        import logging

        from distributed import Client, LocalCluster

        if not os.environ.get("SEGMENT_DEBUG"):  # a lost scheduler is one line, not tracebacks
            names = [n for n in list(logging.root.manager.loggerDict)
                     if n.split(".")[0] in ("distributed", "asyncio", "tornado")]  # fmt: skip
            for name in ["distributed", "distributed.client", *names]:
                logging.getLogger(name).setLevel(logging.CRITICAL + 1)

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
