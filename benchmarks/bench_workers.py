"""How the float-valued fit scales from 1 to 2 workers, phase by phase (issue #6).

Runs ``GaussianMixtureEM(6, tol=1e-3, n_workers=W).fit(X)`` on the cached 1x float32 head of
``bench_suite.py`` (8.7 M voxels, generated there if missing), each worker count in a fresh
subprocess with BLAS threads limited to ``W`` as ``bench_suite.py`` does, and prints per
worker count:

* ``prepare``   the one pass over the data before fitting (summary, checks, fit path);
* ``init``      the initialisation sample and k-means on it;
* ``e0``        the E-step at the initial parameters (initial log-likelihood);
* ``s/iter``    median time of one EM iteration (M-step + chunked E-step), from the callback;
* ``fit``       the whole ``fit`` call;
* ``start-up``  ``fit - n_iter * s/iter``: what does not repeat per iteration (mostly the three
                above), as the issue's numbers count it;

and the 1-worker / 2-worker ratios. With ``--warm`` each child first fits 50 000 voxels of the
scan (untimed), so the timed fit excludes what a process pays once: the thread pool, first
touches of memory (before the E-step was C, numba's set-up on the first call, about 0.3 s).
``--repeat`` runs every case several times, alternating worker counts, and keeps the fastest
of each (other engineers share these 2 cores). Before each
run it waits (up to ``--patience`` s) until the rest of the machine uses at most ``--max-busy``
cores, and prints that and the load average.

Usage::

    python benchmarks/bench_workers.py              # about a minute
    python benchmarks/bench_workers.py --repeat 3 --workers 1 2
    python benchmarks/bench_workers.py --profile 2  # cProfile of one 2-worker fit, top entries
    python benchmarks/bench_workers.py --warm       # a second fit in the process: steady state
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
PHASES = ("prepare", "init", "e0", "startup", "s_per_iter", "fit")


def volume(scale: float) -> Path:
    """The cached float32 head of ``bench_suite.py`` at ``scale``, written there if missing."""
    sys.path.insert(0, str(HERE))
    import bench_suite

    return bench_suite.ensure_volumes(scale, uncompressed_from=8)["float"]


# ============================================================================ child
def child(opts: dict) -> dict:
    """One timed fit, with the phases timed by wrapping the estimator's own steps."""
    import warnings

    import nibabel as nib
    import numpy as np

    from segment import ConvergenceWarning, GaussianMixtureEM

    X = np.asarray(nib.load(opts["input"]).dataobj).reshape(-1, 1)
    if opts.get("warm"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            GaussianMixtureEM(6, max_iter=2, n_workers=opts["workers"]).fit(X[::173][:50_000])
    stamps: list[float] = []
    est = GaussianMixtureEM(
        6, tol=opts["tol"], max_iter=opts["max_iter"], scheduler="threads",
        n_workers=opts["workers"], callback=lambda *a: stamps.append(time.perf_counter()),
    )  # fmt: skip
    spans: dict[str, list[float]] = {}

    def timed(name, method):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spans.setdefault(name, []).append(time.perf_counter() - begin)

        return wrapper

    for name in ("_prepare", "_initial_parameters", "_statistics"):
        setattr(est, name, timed(name, getattr(est, name)))
    warnings.simplefilter("ignore", ConvergenceWarning)
    profiler = None
    if opts.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    est.fit(X)
    seconds = time.perf_counter() - start
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue(), file=sys.stderr)
    s_per_iter = float(np.median(np.diff([start] + stamps)[1:]))
    return {
        "workers": opts["workers"], "prepare": spans["_prepare"][0],
        "init": spans["_initial_parameters"][0], "e0": spans["_statistics"][0],
        "startup": seconds - est.n_iter_ * s_per_iter, "s_per_iter": s_per_iter,
        "fit": seconds, "n_iter": int(est.n_iter_), "ll": float(est.log_likelihood_),
        "means": est.means_.ravel().tolist(),
    }  # fmt: skip


# ============================================================================ parent
def busy_cores(seconds: float = 1.0) -> float:
    """Cores' worth of CPU the whole machine used over ``seconds`` (we are idle meanwhile)."""

    def read():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait

    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def wait_until_idle(max_busy: float, patience: float) -> float:
    """Wait (up to ``patience`` s) until other processes use at most ``max_busy`` cores."""
    deadline = time.monotonic() + patience
    busy = busy_cores()
    while busy > max_busy and time.monotonic() < deadline:
        busy = busy_cores()
    return busy


def run(workers: int, opts: dict, root: Path = ROOT) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), **{v: str(workers) for v in BLAS_THREADS}}
    command = [sys.executable, str(Path(__file__).resolve()), "--child",
               json.dumps({**opts, "workers": workers})]  # fmt: skip
    proc = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"child with {workers} workers failed:\n{proc.stderr[-3000:]}")
    if proc.stderr.strip():
        print(proc.stderr, file=sys.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=2, help="runs per worker count (best kept)")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--profile", type=int, metavar="W", help="profile one fit with W workers")
    parser.add_argument(
        "--warm", action="store_true",
        help="fit 50 000 voxels first in each child, untimed: exclude one-time process costs",
    )  # fmt: skip
    parser.add_argument(
        "--max-busy", type=float, default=0.3,
        help="before each run, wait (up to --patience s) until others use at most this many cores",
    )  # fmt: skip
    parser.add_argument("--patience", type=float, default=60.0)
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="import segment from this tree (before/after)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    opts = {"input": str(volume(args.scale)), "tol": args.tol, "max_iter": args.max_iter,
            "warm": args.warm}  # fmt: skip
    if args.profile:
        run(args.profile, {**opts, "profile": True}, args.root)
        return
    best: dict[int, dict] = {}
    for _ in range(args.repeat):
        for workers in args.workers:
            busy = wait_until_idle(args.max_busy, args.patience)
            load = os.getloadavg()[0]
            result = run(workers, opts, args.root)
            print(
                f"busy {busy:4.2f} cores, load {load:4.2f}  workers {workers}: "
                + "  ".join(f"{p} {result[p]:.3f}" for p in PHASES)
                + f"  n_iter {result['n_iter']}",
                file=sys.stderr,
                flush=True,
            )
            if workers not in best or result["fit"] < best[workers]["fit"]:
                best[workers] = result
    print(
        f"\nfloat32 head x{args.scale:g}, segment from {args.root}, "
        f"fastest of {args.repeat} per worker count (seconds)"
        + (", after an untimed warm-up fit" if args.warm else "")
    )
    print(f"{'workers':>8}" + "".join(f"{p:>12}" for p in PHASES) + f"{'n_iter':>8}")
    for workers, result in best.items():
        print(f"{workers:>8}" + "".join(f"{result[p]:12.3f}" for p in PHASES)
              + f"{result['n_iter']:>8}")  # fmt: skip
    if 1 in best:
        for workers in best:
            if workers != 1:
                print(f"{'1/' + str(workers):>8}" + "".join(
                    f"{best[1][p] / best[workers][p]:11.2f}x" for p in PHASES))  # fmt: skip
    lls = {w: r["ll"] for w, r in best.items()}
    print(f"log-likelihood per worker count: {lls}")
    print(f"means: {best[args.workers[0]]['means']}")


if __name__ == "__main__":
    main()
