"""Peak memory and time of ``segment run`` / ``segment_file``, phase by phase (issue #6).

Two cases, each in a fresh subprocess (so ``ru_maxrss`` is this case's alone):

* ``run``     ``segment run INPUT -o OUT --no-qc --overwrite -q --tol 1e-3 --workers W`` (the
              console script, as in ``bench_suite.py``): wall time and peak RSS from ``os.wait4``;
* ``phases``  ``segment.api.segment_file`` in-process with an RSS sampler (every 5 ms) that
              records the peak of each phase: load, fit, labels / predict, write dseg, write
              probseg, sidecar.

The volumes are ``bench_suite.py``'s generated heads, cached in ``benchmarks/.cache/``
(``head_v2_x8_float32.nii`` is the 0.5 mm float case, 69 M voxels, ~2-3 min per run).
A smaller scale with a low ``--memory-limit`` forces the streamed path quickly::

    python benchmarks/bench_write.py --scale 8 --dtype float                 # the issue's case
    python benchmarks/bench_write.py --scale 2 --memory-limit 300MB --case phases
    python benchmarks/bench_write.py --scale 1 --case run --repeat 2         # the 1x time
    python benchmarks/bench_write.py --scale 8 --source /tmp/old   # A/B: another copy of segment/

The 1-minute load average is printed before and after each case: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_suite  # noqa: E402  (the volume generator and the RSS sampler)


def case_phases(opts: dict) -> dict:
    """``segment_file`` in this process, with the peak RSS of each phase in MB."""
    import warnings

    from segment import api, io, mixture, sidecar

    memory = bench_suite.RSSSampler()

    def phase(owner, name, label):
        bench_suite.mark_phase(memory, owner, name, label)

    phase(io, "load_scan", "load")
    phase(mixture.GaussianMixtureEM, "fit", "fit")
    phase(mixture.GaussianMixtureEM, "_labels", "labels")
    phase(mixture.GaussianMixtureEM, "predict_with_proba", "predict")
    phase(io, "write_labels", "write dseg")
    phase(io, "write_probabilities", "write probseg")
    phase(sidecar, "build_sidecar", "sidecar")
    warnings.simplefilter("ignore")
    with memory:
        memory.mark("other")
        start = time.perf_counter()
        result = api.segment_file(
            opts["input"], opts["out_dir"], overwrite=True, qc=False, tol=opts["tol"],
            workers=opts["workers"], memory_limit=opts["memory_limit"],
        )  # fmt: skip
        seconds = time.perf_counter() - start
    return {
        "e2e_s": seconds,
        "streamed": result.flat_responsibilities is None,
        "timings": result.timings,
        "baseline_mb": memory.baseline,
        "phase_peaks_mb": memory.peaks,
    }


def run_child(command: list[str], source: Path | None = None) -> dict:
    """Run ``command`` in a fresh process: wall time, CPU time, peak RSS (``ru_maxrss``).

    ``source``: the folder holding the ``segment`` package to import (default: this checkout).
    """
    env = {**os.environ, "PYTHONPATH": str(source or HERE.parent)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=HERE.parent)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}  # fmt: skip


def measure(case: str, input_path: Path, out_dir: Path, args) -> dict:
    if case == "run":
        command = [bench_suite.SEGMENT, "run", str(input_path), "-o", str(out_dir),
                   "--overwrite", "-q", "--no-qc", "--tol", str(args.tol),
                   "--workers", str(args.workers)]  # fmt: skip
        if args.memory_limit:
            command += ["--memory-limit", args.memory_limit]
        result = run_child(command, args.source)
        result.pop("stdout")
        record = json.loads(next(out_dir.glob("*_segment.json")).read_text())
        result["timings"] = record["timings_s"]
        return result
    opts = {"input": str(input_path), "out_dir": str(out_dir), "tol": args.tol,
            "workers": args.workers, "memory_limit": args.memory_limit}  # fmt: skip
    command = [sys.executable, __file__, "--child-opts", json.dumps(opts)]
    result = run_child(command, args.source)
    result.update(json.loads(result.pop("stdout").strip().splitlines()[-1]))
    return result


def report(case: str, result: dict, load_before: float) -> str:
    lines = [
        f"{case}: wall {result['wall_s']:.1f} s, cpu {result['cpu_s']:.1f} s, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB, load1 {load_before:.2f} -> "
        f"{os.getloadavg()[0]:.2f}"
    ]
    timings = result.get("timings", {})
    lines.append("  timings: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    if "phase_peaks_mb" in result:
        lines.append(f"  streamed: {result['streamed']}, baseline {result['baseline_mb']:.0f} MB")
        lines += [f"  {name:>14}: {mb:7.0f} MB" for name, mb in result["phase_peaks_mb"].items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=8.0)
    parser.add_argument("--dtype", choices=["int", "float"], default="float")
    parser.add_argument("--case", choices=["run", "phases", "both"], default="run")
    parser.add_argument("--memory-limit", default=None, help="e.g. 300MB (default: segment's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--uncompressed-from", type=float, default=8.0)
    parser.add_argument("--keep", type=Path, help="write the outputs here instead of a tmp dir")
    parser.add_argument(
        "--source", type=Path, help="folder with another `segment` package to measure (A/B)"
    )
    parser.add_argument("--child-opts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_opts:
        print(json.dumps(case_phases(json.loads(args.child_opts))))
        return
    input_path = bench_suite.ensure_volumes(args.scale, args.uncompressed_from)[args.dtype]
    cases = ["run", "phases"] if args.case == "both" else [args.case]
    print(f"{input_path.name}, source {args.source or HERE.parent}, memory limit "
          f"{args.memory_limit or 'default'}, workers {args.workers}, {os.cpu_count()} cores",
          flush=True)  # fmt: skip
    for case in cases:
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(dir=HERE / ".cache") as tmp:
                out_dir = args.keep or Path(tmp)
                load = os.getloadavg()[0]
                result = measure(case, input_path, out_dir, args)
                print(report(case, result, load), flush=True)


if __name__ == "__main__":
    main()
