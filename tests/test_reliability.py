"""Reliability: hostile files, the exit-code contract, kills while outputs are written,
concurrent batches, temp files of dead writers.

The kill tests run ``segment`` in a subprocess with ``SEGMENT_KILL_AT`` naming the moment of
writing at which it kills itself with SIGKILL (see :func:`segment.io.kill_point`), so each
moment is hit exactly, not after a guessed sleep.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import click
import hostile
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from segment import io as io_module
from segment.batch import LOCK_NAME, batch_lock, escape_tsv, read_summary, unescape_tsv
from segment.cli import cli
from segment.evaluate import evaluate_files
from segment.exceptions import InputError
from segment.io import load_scan, pid_alive, remove_stale_temporaries
from segment.sidecar import missing_outputs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ hostile files
def test_fuzzed_headers_and_gzip_streams_are_read_or_refused_in_one_line(tmp_path):
    """600 seeded mutations: each is read or refused with a one-line InputError naming the
    file; no other exception; no corrupt gzip stream is accepted."""
    kinds = {"ok": 0, "refused": 0}
    for name, kind, what, data in hostile.mutations(seed=7, n=600):
        path = tmp_path / name
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. unknown units: a warning, not an error
                scan = load_scan(path)
        except InputError as error:
            kinds["refused"] += 1
            assert str(error).startswith(f"{path}: "), what
            assert "\n" not in str(error), what
            continue
        kinds["ok"] += 1
        assert kind != "gzip" or not hostile.corrupt_gzip(data), f"corrupt gzip accepted: {what}"
        assert scan.data.ndim in (2, 3) and all(z > 0 for z in scan.zooms), what
        assert np.all(np.isfinite(scan.affine)), what
    assert kinds["ok"] > 50 and kinds["refused"] > 200  # both paths exercised


def test_huge_header_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(hostile.huge_header_file((2000, 2000, 2000)))
    assert path.stat().st_size < 10_000
    with pytest.raises(InputError, match=r"claims 32 GB .* gzip file can hold at most"):
        load_scan(path)


def test_claimed_size_above_the_memory_limit_is_refused(tmp_path):
    raw = hostile.nifti_bytes(np.zeros((64, 64, 64), np.float32))  # 1 MB of zeros
    path = tmp_path / "zeros.nii.gz"
    path.write_bytes(hostile.gz(raw))
    assert load_scan(path).shape == (64, 64, 64)
    with pytest.raises(InputError, match=r"take 1.05 MB in memory .* more than the memory limit"):
        load_scan(path, memory_limit=500_000)


@pytest.mark.parametrize("damage", ["crc", "isize", "middle"])
def test_corrupt_gzip_is_refused(tmp_path, damage):
    data = bytearray(hostile.gz(hostile.nifti_bytes()))
    index = {"crc": -7, "isize": -3, "middle": len(data) // 2}[damage]
    data[index] ^= 0x10
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(bytes(data))
    assert hostile.corrupt_gzip(bytes(data))
    with pytest.raises(InputError, match="corrupt gzip stream"):
        load_scan(path)


def test_trailing_members_are_checked_too(tmp_path):
    """A multi-member stream (as our writers make) is read whole: a bad last member fails."""
    raw = hostile.nifti_bytes()
    good = hostile.gz(raw[:400]) + hostile.gz(raw[400:])
    (tmp_path / "two.nii.gz").write_bytes(good)
    np.testing.assert_array_equal(load_scan(tmp_path / "two.nii.gz").data, hostile.base_volume())
    bad = bytearray(good)
    bad[-6] ^= 1
    (tmp_path / "bad.nii.gz").write_bytes(bytes(bad))
    with pytest.raises(InputError, match="CRC check failed"):
        load_scan(tmp_path / "bad.nii.gz")


def test_special_files_are_named(tmp_path):
    fifo = tmp_path / "pipe.nii"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a FIFO"):
        load_scan(fifo)
    device = tmp_path / "zero.nii"
    device.symlink_to("/dev/zero")
    with pytest.raises(InputError, match="is a character device"):
        load_scan(device)


def test_bad_geometry_and_values_are_refused(tmp_path):
    img = nib.Nifti1Image(hostile.base_volume().astype(np.float64) * 1e298, np.eye(4))
    nib.save(img, tmp_path / "big_values.nii.gz")
    with pytest.raises(InputError, match=r"intensities reach 3.*e\+300"):
        load_scan(tmp_path / "big_values.nii.gz")
    raw = bytearray(hostile.nifti_bytes())
    struct.pack_into("<f", raw, 84, np.inf)  # pixdim[2]
    (tmp_path / "inf_voxel.nii").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="must be finite and > 0"):
        load_scan(tmp_path / "inf_voxel.nii")


def test_cli_reader_errors_are_one_line_without_nibabel_noise(tmp_path):
    raw = bytearray(hostile.nifti_bytes())
    raw[70:72] = (1).to_bytes(2, "little")  # datatype 1: binary, which nibabel does not read
    path = tmp_path / "bool.nii.gz"
    path.write_bytes(hostile.gz(bytes(raw)))
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: {path}: cannot read NIfTI header: data code 1 not supported"
    ]


# ------------------------------------------------------------------------------ exit codes
#: A bad value for every option of `run` and `batch` that takes a value.
BAD_VALUES = {
    "pipeline": ["no-such-pipeline", "{bad_toml}", "{unknown_key_toml}"],
    "n_components": ["0", "256", "three"],
    "mask": ["{{bogus}}_m.nii.gz"],
    "max_iter": ["0", "1.5"],
    "tol": ["nan", "inf", "-1"],
    "seed": ["-5", "4294967296"],
    "variance_floor": ["0", "inf", "nan"],
    "chunk_size": ["0", "1e20", "100000000000000000000"],
    "scheduler": ["bogus"],
    "workers": ["0", "100000"],
    "mrf_beta": ["nan", "inf", "-0.1"],
    "bias_smoothness": ["0", "inf", "nan"],
    "compression_level": ["10", "-1"],
    "memory_limit": ["lots", "0", "-1GB"],
    "jobs": ["0", "x"],
    "qc_histogram": ["cubic"],
}
#: Options whose values are paths or free text: any value is usable, or a file problem (1).
NO_BAD_VALUE = {"out_dir", "patterns", "subjects", "sessions", "suffixes"}


def _value_options(command: str) -> list[click.Option]:
    params = cli.commands[command].params
    return [p for p in params if isinstance(p, click.Option) and not p.is_flag and p.name != "help"]


@pytest.mark.parametrize("command", ["run", "batch"])
def test_every_option_has_a_bad_value_in_the_contract(command):
    names = {p.name for p in _value_options(command)}
    assert names - NO_BAD_VALUE <= set(BAD_VALUES), sorted(names - NO_BAD_VALUE - set(BAD_VALUES))


def _bad_cases():
    for command in ("run", "batch"):
        for param in _value_options(command):
            for value in BAD_VALUES.get(param.name, []):
                yield command, param.opts[-1], value


@pytest.mark.parametrize(("command", "option", "value"), list(_bad_cases()))
def test_bad_option_values_exit_2(tmp_path, command, option, value):
    scan = tmp_path / "in" / "scan.nii.gz"
    scan.parent.mkdir()
    nib.save(nib.Nifti1Image(hostile.base_volume(), np.eye(4)), scan)
    (tmp_path / "bad.toml").write_text("this is [not toml")
    (tmp_path / "unknown.toml").write_text('description = "x"\n[model]\nbogus = 1\n')
    value = value.format(bad_toml=tmp_path / "bad.toml", unknown_key_toml=tmp_path / "unknown.toml")
    target = str(scan) if command == "run" else str(scan.parent)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [command, target, "-o", str(out), option, value])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Error: " in result.stderr and "unexpected" not in result.stderr
    assert not out.exists()


def _run(args, env_extra=None, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "segment", *args], capture_output=True, text=True, env=env,
        timeout=timeout, cwd=cwd,
    )  # fmt: skip


# ------------------------------------------------------------------------------ kills
def _set_state(out: Path, stem: str) -> str:
    """'complete-K<k>' (consistent set), 'incomplete' (no sidecar) or 'MIXED ...'."""
    sidecar = out / f"{stem}_segment.json"
    if missing_outputs(sidecar):
        return "incomplete" if not sidecar.exists() else "MIXED: sidecar with missing outputs"
    k = json.loads(sidecar.read_text())["model"]["n_components"]
    dseg = np.asanyarray(nib.load(out / f"{stem}_dseg.nii.gz").dataobj)
    prob = nib.load(out / f"{stem}_probseg.nii.gz")
    if prob.shape[-1] != k or dseg.max() != k:
        return f"MIXED: sidecar K={k}, dseg max {dseg.max()}, probseg {prob.shape[-1]} maps"
    return f"complete-K{k}"


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if io_module.TEMPORARY_NAME.match(p.name)]


#: Moments of `segment run` with dseg, dseg.tsv, probseg, QC and sidecar outputs.
SLOW = pytest.mark.slow
RUN_POINTS = [
    "stage-3",
    "commit-retired",
    "commit-1",
    "commit-4",  # the sidecar, moved last (after dseg, dseg.tsv, probseg and QC)
    *(pytest.param(p, marks=SLOW) for p in ("stage-1", "commit-0", "commit-2", "commit-3")),
]


@pytest.mark.parametrize("point", RUN_POINTS)
def test_run_overwrite_killed_while_writing_never_leaves_a_mixed_set(tmp_path, point):
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(hostile.base_volume(), np.diag([1.5, 2, 2.5, 1])), scan)
    out = tmp_path / "out"
    first = _run(["run", str(scan), "-o", str(out), "-k", "3", "-q"])
    assert first.returncode == 0, first.stderr
    assert _set_state(out, "scan") == "complete-K3"
    killed = _run(["run", str(scan), "-o", str(out), "-k", "2", "-q", "--overwrite"],
                  {"SEGMENT_KILL_AT": point})  # fmt: skip
    assert killed.returncode == -9, killed.stderr  # it was killed at that moment
    state = _set_state(out, "scan")
    assert not state.startswith("MIXED"), state
    expected = {"stage-1": "complete-K3", "stage-3": "complete-K3", "commit-4": "complete-K2"}
    assert state == expected.get(point, "incomplete")
    if state == "incomplete" and (out / "scan_dseg.nii.gz").exists():  # evaluate says so
        with pytest.warns(UserWarning, match="output set is incomplete"):
            evaluate_files(out / "scan_dseg.nii.gz", out / "scan_dseg.nii.gz")
    again = _run(["run", str(scan), "-o", str(out), "-k", "2", "-q", "--overwrite"])
    assert again.returncode == 0, again.stderr
    assert _set_state(out, "scan") == "complete-K2"
    assert _temporaries(out) == []  # the killed run's temp files are gone


def _write_scans(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        volume = hostile.base_volume(seed=i)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"s{i}.nii.gz")


BATCH = ["-k", "3", "--scheduler", "synchronous", "-q", "--no-qc"]


@pytest.mark.parametrize(
    "point",
    [
        "commit-1",
        *(pytest.param(p, marks=SLOW) for p in ("stage-0", "commit-retired", "summary-2")),
    ],
)
def test_batch_killed_while_writing_resumes_to_a_clean_result(tmp_path, point):
    scans = tmp_path / "in"
    _write_scans(scans, 3)
    clean = _run(["batch", str(scans), "-o", str(tmp_path / "clean"), *BATCH])
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out"
    killed = _run(["batch", str(scans), "-o", str(out), *BATCH], {"SEGMENT_KILL_AT": point})
    assert killed.returncode == -9
    for i in range(3):
        assert not _set_state(out, f"s{i}").startswith("MIXED")
    resumed = _run(["batch", str(scans), "-o", str(out), *BATCH])
    assert resumed.returncode == 0, resumed.stderr
    assert _temporaries(out) == []
    rows = read_summary(out / "batch_summary.tsv")
    assert [r["input"] for r in rows] == ["s0.nii.gz", "s1.nii.gz", "s2.nii.gz"]
    assert {r["status"] for r in rows} <= {"ok", "skipped"}
    for i in range(3):
        for suffix in ("dseg", "probseg"):
            name = f"s{i}_{suffix}.nii.gz"
            assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


# ------------------------------------------------------------------------------ dead writers
def test_zombie_writers_are_dead(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):  # wait until it has exited, without reaping it
        with open(f"/proc/{child.pid}/stat", "rb") as stat_file:
            if stat_file.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                break
        time.sleep(0.01)
    assert not pid_alive(child.pid)
    stale = tmp_path / f".x_dseg.tmp-{child.pid}-0123abcd.nii.gz"
    stale.write_bytes(b"half")
    live = tmp_path / f".y_dseg.tmp-{os.getpid()}-0123abcd.nii.gz"
    live.write_bytes(b"mine")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists()
    child.wait()


# ------------------------------------------------------------------------------ one writer
def test_second_batch_into_a_locked_folder_refuses_at_once(tmp_path):
    scans = tmp_path / "in"
    _write_scans(scans, 2)
    out = tmp_path / "out"
    out.mkdir()
    with batch_lock(out):
        result = CliRunner().invoke(cli, ["batch", str(scans), "-o", str(out), *BATCH])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: {out}: another segment batch (pid {os.getpid()} on "
        + result.stderr.split(" on ", 1)[1].split(")")[0]
        + ") is writing into this folder; wait for it to finish or give another --out-dir"
    ]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    again = CliRunner().invoke(cli, ["batch", str(scans), "-o", str(out), *BATCH])
    assert again.exit_code == 0, again.output  # the lock went with its holder


def test_two_concurrent_batches_write_no_wrong_row(tmp_path):
    scans = tmp_path / "in"
    _write_scans(scans, 4)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "segment", "batch", str(scans), "-o", str(out), *BATCH]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    codes = [first.wait(300), second.wait(300)]
    errors = [first.stderr.read().decode(), second.stderr.read().decode()]
    rows = read_summary(out / "batch_summary.tsv")
    assert [r["status"] for r in rows] == ["ok"] * 4 or [r["status"] for r in rows] == [
        "skipped"
    ] * 4, rows
    refused = [e for e in errors if "another segment batch" in e]
    assert sorted(codes) == ([0, 1] if refused else [0, 0]), errors
    for i in range(4):
        assert _set_state(out, f"s{i}") == "complete-K3"


# ------------------------------------------------------------------------------ summary
def test_tsv_escaping_round_trips():
    for text in ["plain", "tab\there", "new\nline", "back\\slash\\t", "cr\r", "\\n"]:
        assert "\t" not in escape_tsv(text) and "\n" not in escape_tsv(text)
        assert unescape_tsv(escape_tsv(text)) == text


def test_file_name_with_tab_and_newline_is_one_summary_row(tmp_path):
    scans = tmp_path / "in"
    scans.mkdir()
    name = "evil\tname\nok\tfailed.nii.gz"
    nib.save(nib.Nifti1Image(hostile.base_volume(), np.eye(4)), scans / name)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["batch", str(scans), "-o", str(out), *BATCH])
    assert result.exit_code == 0, result.output
    text = (out / "batch_summary.tsv").read_text()
    assert len(text.splitlines()) == 2  # header + one row
    rows = read_summary(out / "batch_summary.tsv")
    assert [(r["input"], r["status"]) for r in rows] == [(name, "ok")]


# ------------------------------------------------------------------------------ cluster faults
def _clean_outputs(tmp_path: Path, scans: Path) -> Path:
    clean = tmp_path / "clean"
    result = _run(["batch", str(scans), "-o", str(clean), *BATCH])
    assert result.returncode == 0, result.stderr
    return clean


def _same_results(out: Path, clean: Path, n: int) -> None:
    for i in range(n):
        for suffix in ("dseg", "probseg"):
            name = f"s{i}_{suffix}.nii.gz"
            assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_worker_killed_in_the_middle_of_a_batch(tmp_path, monkeypatch):
    """A LocalCluster worker SIGKILLed while writing a scan's outputs: the scan is rerun on
    another worker and every result equals a clean run's; no temp file is left."""
    from distributed import LocalCluster

    from segment.batch import run_batch

    scans = tmp_path / "in"
    _write_scans(scans, 4)
    clean = _clean_outputs(tmp_path, scans)
    once = tmp_path / "killed-once"
    monkeypatch.setenv("SEGMENT_KILL_AT", "commit-1")  # inherited by the worker processes
    monkeypatch.setenv("SEGMENT_KILL_ONCE", str(once))
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        result = run_batch(scans, out, settings={"n_components": 3, "qc": False},
                           scheduler=cluster.scheduler_address)  # fmt: skip
    assert once.exists()  # a worker was killed
    assert [row["status"] for row in result.rows] == ["ok"] * 4, result.rows
    _same_results(out, clean, 4)
    assert _temporaries(out) == []


@pytest.mark.slow
def test_scheduler_lost_in_the_middle_of_a_batch(tmp_path):
    """The scheduler SIGKILLed while a worker writes: one clear line, exit 1, nothing
    half-written; a rerun finishes the batch with the results of a clean run."""
    import socket
    import time

    scans = tmp_path / "in"
    _write_scans(scans, 4)
    clean = _clean_outputs(tmp_path, scans)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    address = f"tcp://127.0.0.1:{port}"
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", str(port),
         "--no-dashboard"], env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    worker_env = {**env, "SEGMENT_KILL_AT": "commit-1", "SEGMENT_KILL_PID": str(scheduler.pid),
                  "SEGMENT_KILL_ONCE": str(tmp_path / "once")}  # fmt: skip
    time.sleep(2)
    worker = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
         "--no-dashboard"], env=worker_env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out = tmp_path / "out"
        lost = _run(["batch", str(scans), "-o", str(out), *BATCH[:2], "-q", "--no-qc",
                     "--scheduler", address])  # fmt: skip
        assert lost.returncode == 1
        assert lost.stderr.splitlines()[-1].startswith(
            f"Error: lost the connection to the dask scheduler {address}"
        )
        assert len(lost.stderr.splitlines()) == 1, lost.stderr
        for i in range(4):
            assert not _set_state(out, f"s{i}").startswith("MIXED")
    finally:
        worker.kill()
        scheduler.kill()
        worker.wait()
        scheduler.wait()
    rerun = _run(["batch", str(scans), "-o", str(out), *BATCH])
    assert rerun.returncode == 0, rerun.stderr
    _same_results(out, clean, 4)
    assert _temporaries(out) == []
