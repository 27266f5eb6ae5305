"""Reliability figures: hostile headers, kills while writing, concurrent batches, a soak.

    PYTHONPATH=. python benchmarks/bench_reliability.py huge
    PYTHONPATH=. python benchmarks/bench_reliability.py kills --trials 24
    PYTHONPATH=. python benchmarks/bench_reliability.py concurrent --trials 5
    PYTHONPATH=. python benchmarks/bench_reliability.py soak --scans 1000

(the fuzzer of headers and gzip streams through `segment run` is benchmarks/fuzz_cli.py).
Each prints one JSON record; the figures are in benchmarks/README.md ("Reliability").
Kills use the SEGMENT_KILL_AT hook (segment.io.kill_point): the process SIGKILLs itself at
a named moment of writing its outputs, chosen at random (seeded) for each trial.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import hostile  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def segment(args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "segment", *args], capture_output=True,
                          text=True, env={**ENV, **(env or {})}, **kwargs)  # fmt: skip


def timed_child(args) -> dict:
    """Run ``segment args``; wall time, peak RSS of the process (MB), exit code, stderr."""
    # GNU time measures the peak RSS of the exec'd program alone (a forked child's
    # ru_maxrss can include the memory of this process at the fork)
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "segment", *args],
                          env=ENV, capture_output=True, text=True)  # fmt: skip
    *err, peak_kb = done.stderr.strip().splitlines()
    return {"seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(int(peak_kb) / 1024, 1),
            "exit": done.returncode, "stderr": "\n".join(err)}  # fmt: skip


# ------------------------------------------------------------------------------ huge headers
def bench_huge(args) -> dict:
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for side in (2000, 1200):
            path = tmp / f"claims_{side}.nii.gz"
            path.write_bytes(hostile.huge_header_file((side, side, side)))
            run = timed_child(["run", str(path), "-o", str(tmp / "out")])
            records[f"{side}^3 float32 in {path.stat().st_size} bytes"] = run
            run = timed_child(["run", str(path), "-o", str(tmp / "out"), "--memory-limit", "64GB"])
            records[f"{side}^3 float32, --memory-limit 64GB"] = run
        # a real 108 MB volume compressed, then cut in half: streamed, then refused
        rng = np.random.default_rng(0)
        volume = rng.normal(100, 10, (300, 300, 300)).astype(np.float32)
        full = tmp / "full.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.eye(4)), full)
        del volume
        cut = tmp / "cut.nii.gz"
        cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
        records["300^3 float32 .nii.gz cut in half"] = timed_child(
            ["run", str(cut), "-o", str(tmp / "out")]
        )
        bad = bytearray(full.read_bytes())
        bad[-6] ^= 1
        crc = tmp / "crc.nii.gz"
        crc.write_bytes(bytes(bad))
        records["300^3 float32 .nii.gz, CRC damaged"] = timed_child(
            ["run", str(crc), "-o", str(tmp / "out")]
        )
    return records


# ------------------------------------------------------------------------------ kills
RUN_POINTS = ["stage-0", "stage-1", "stage-2", "stage-3", "commit-retired", "commit-0",
              "commit-1", "commit-2", "commit-3"]  # fmt: skip
BATCH_POINTS = [*RUN_POINTS, "summary-1", "summary-2", "summary-3", "summary-4"]
BATCH = ["-k", "3", "--scheduler", "synchronous", "-q"]


def set_state(out: Path, stem: str) -> str:
    """complete-K<k> / incomplete / MIXED (a set that looks complete but is not one run's)."""
    from segment.sidecar import missing_outputs

    sidecar = out / f"{stem}_segment.json"
    if missing_outputs(sidecar):
        return "incomplete" if not sidecar.exists() else "MIXED"
    record = json.loads(sidecar.read_text())
    k = record["model"]["n_components"]
    dseg = np.asanyarray(nib.load(out / f"{stem}_dseg.nii.gz").dataobj)
    prob = nib.load(out / f"{stem}_probseg.nii.gz")
    return f"complete-K{k}" if prob.shape[-1] == k and dseg.max() == k else "MIXED"


def temporaries(folder: Path) -> list[Path]:
    from segment.io import TEMPORARY_NAME

    return [p for p in folder.rglob("*") if TEMPORARY_NAME.match(p.name)]


def write_scans(folder: Path, n: int, shape=(8, 9, 10)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        levels = np.repeat([100, 200, 300], [shape[2] // 3, shape[2] // 3,
                                             shape[2] - 2 * (shape[2] // 3)])  # fmt: skip
        volume = (levels[None, None, :] + rng.normal(0, 10, shape)).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / f"s{i}.nii.gz")


def bench_kills(args) -> dict:
    rng = random.Random(args.seed)
    counts = {"run_trials": 0, "batch_trials": 0, "killed": 0, "mixed_sets_looking_complete": 0,
              "temp_files_after_next_run": 0, "finished_results_lost": 0,
              "resumed_results_differing_from_clean": 0}  # fmt: skip
    states = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = tmp / "in"
        write_scans(scans, 4)
        clean = tmp / "clean"
        assert segment(["batch", str(scans), "-o", str(clean), *BATCH]).returncode == 0
        for trial in range(args.trials):
            out = tmp / f"t{trial}"
            if trial % 2 == 0:  # run --overwrite, K=3 over K=2 or back
                point = rng.choice(RUN_POINTS)
                counts["run_trials"] += 1
                scan = scans / "s0.nii.gz"
                assert segment(["run", str(scan), "-o", str(out), "-k", "2", "-q"]).returncode == 0
                killed = segment(["run", str(scan), "-o", str(out), "-k", "3", "-q",
                                  "--overwrite"], {"SEGMENT_KILL_AT": point})  # fmt: skip
                counts["killed"] += killed.returncode == -9
                state = set_state(out, "s0")
                states[f"run {point}"] = state
                counts["mixed_sets_looking_complete"] += state == "MIXED"
                again = segment(["run", str(scan), "-o", str(out), "-k", "3", "-q", "--overwrite"])
                assert again.returncode == 0, again.stderr
            else:  # a batch of 4 scans
                point = rng.choice(BATCH_POINTS)
                counts["batch_trials"] += 1
                killed = segment(["batch", str(scans), "-o", str(out), *BATCH],
                                 {"SEGMENT_KILL_AT": point})  # fmt: skip
                counts["killed"] += killed.returncode == -9
                finished = {}
                for i in range(4):
                    state = set_state(out, f"s{i}")
                    counts["mixed_sets_looking_complete"] += state == "MIXED"
                    if state.startswith("complete"):
                        finished[i] = (out / f"s{i}_dseg.nii.gz").read_bytes()
                states[f"batch {point}"] = f"{len(finished)} of 4 finished"
                again = segment(["batch", str(scans), "-o", str(out), *BATCH])
                assert again.returncode == 0, again.stderr
                for i, data in finished.items():
                    counts["finished_results_lost"] += (
                        out / f"s{i}_dseg.nii.gz"
                    ).read_bytes() != data
                for i in range(4):
                    for suffix in ("dseg", "probseg"):
                        name = f"s{i}_{suffix}.nii.gz"
                        counts["resumed_results_differing_from_clean"] += (
                            out / name
                        ).read_bytes() != (clean / name).read_bytes()
            counts["temp_files_after_next_run"] += len(temporaries(out))
            shutil.rmtree(out)
    return {**counts, "states": states}


# ------------------------------------------------------------------------------ concurrency
def bench_concurrent(args) -> dict:
    wrong = refused = 0
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = tmp / "in"
        write_scans(scans, 8)
        from segment.batch import read_summary

        for trial in range(args.trials):
            out = tmp / f"t{trial}"
            command = [sys.executable, "-m", "segment", "batch", str(scans), "-o", str(out),
                       *BATCH, "--no-qc"]  # fmt: skip
            first = subprocess.Popen(command, env=ENV, stderr=subprocess.PIPE)
            second = subprocess.Popen(command, env=ENV, stderr=subprocess.PIPE)
            codes = [first.wait(), second.wait()]
            errors = [first.stderr.read().decode(), second.stderr.read().decode()]
            rows = read_summary(out / "batch_summary.tsv")
            bad = sum(r["status"] not in ("ok", "skipped") for r in rows) + abs(len(rows) - 8)
            bad += sum(not set_state(out, f"s{i}").startswith("complete") for i in range(8))
            wrong += bad
            refused += sum("another segment batch" in e for e in errors)
            trials.append({"exit_codes": codes, "wrong_rows": bad})
    return {"trials": args.trials, "wrong_rows": wrong, "second_batch_refused": refused,
            "per_trial": trials}  # fmt: skip


# ------------------------------------------------------------------------------ soak
def bench_soak(args) -> dict:
    from segment.batch import run_batch

    def rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scans = tmp / "in"
        write_scans(scans, args.scans, shape=(16, 17, 18))
        rss = []
        start = time.perf_counter()
        result = run_batch(scans, tmp / "out", settings={"n_components": 3, "qc": True},
                           scheduler="synchronous",
                           on_result=lambda row, done, total: rss.append(rss_mb()))  # fmt: skip
        seconds = time.perf_counter() - start
    statuses = {s: sum(r["status"] == s for r in result.rows) for s in ("ok", "failed")}
    window = rss[99:]
    return {"scans": args.scans, "seconds": round(seconds, 1), **statuses,
            "rss_mb_at": {n: round(rss[n - 1], 1) for n in (1, 10, 100, 250, 500, 750,
                                                             len(rss))},
            "rss_growth_100_to_end": round(window[-1] / window[0] - 1, 4),
            "rss_max_over_min_100_to_end": round(max(window) / min(window) - 1, 4)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["huge", "kills", "concurrent", "soak"])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--scans", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bench = {"huge": bench_huge, "kills": bench_kills, "concurrent": bench_concurrent,
             "soak": bench_soak}[args.what]  # fmt: skip
    print(json.dumps(bench(args), indent=1))


if __name__ == "__main__":
    main()
