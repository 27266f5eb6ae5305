"""Benchmark: ``segment.GaussianMixtureEM`` against scikit-learn's ``GaussianMixture``.

Generates ~9 million one-channel voxels of a 6-class Gaussian mixture, once float-valued and
once rounded to int16 (an integer-valued scan, where ``segment`` fits the distinct values
weighted by their counts). k-means initialisation runs ONCE in this process; both estimators
then start from the SAME weights, means and precisions and stop on the same ``tol`` (change of
the mean log-likelihood per voxel). Each fit runs in a fresh subprocess so that its peak
memory (RSS above the baseline with the data loaded) is measured cleanly.

Usage::

    python benchmarks/bench_em.py            # 9 M voxels
    python benchmarks/bench_em.py --quick    # 1 M voxels
    python benchmarks/bench_em.py --n-voxels 4000000 --workers 2

Not part of the test run. Needs scikit-learn and psutil.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MEANS = np.array([150.0, 400.0, 650.0, 900.0, 1250.0, 1600.0])
SDS = np.array([40.0, 55.0, 60.0, 70.0, 90.0, 100.0])
WEIGHTS = np.array([0.10, 0.15, 0.20, 0.25, 0.18, 0.12])
SEED = 20240601
GENERATION_CHUNK = 1 << 20


def make_data(n_voxels: int, kind: str) -> np.ndarray:
    """(N, 1) features of the 6-class mixture, generated chunk by chunk (no big temporaries).

    ``kind`` is ``"float"`` (float64) or ``"int"`` (the same values rounded to int16).
    """
    rng = np.random.default_rng(SEED)
    dtype = np.float64 if kind == "float" else np.int16
    X = np.empty((n_voxels, 1), dtype=dtype)
    for start in range(0, n_voxels, GENERATION_CHUNK):
        n = min(GENERATION_CHUNK, n_voxels - start)
        labels = rng.choice(len(MEANS), size=n, p=WEIGHTS)
        values = rng.normal(MEANS[labels], SDS[labels])
        X[start : start + n, 0] = values if kind == "float" else np.round(values)
    return X


def initial_parameters(X: np.ndarray, n_sample: int = 200_000) -> dict:
    """k-means (k-means++ seeds, Lloyd steps) on a seeded subsample, run once."""
    from segment import _em, _kmeans

    rng = np.random.default_rng(0)
    index = np.sort(rng.choice(len(X), size=min(n_sample, len(X)), replace=False))
    sample = X[index].astype(np.float64)
    weight = np.ones(len(sample))
    _, labels = _kmeans.kmeans(sample, weight, len(MEANS), rng)
    weights, means, covariances = _kmeans.parameters_from_clusters(
        sample, weight, labels, len(MEANS)
    )
    floor = 1e-3 * sample.var(axis=0)
    covariances = _em.floor_covariances(covariances, floor)
    order = np.argsort(means[:, 0])
    return dict(weights=weights[order], means=means[order], covariances=covariances[order])


# ----------------------------------------------------------------------------- one case
class PeakRSS:
    """Sample this process's RSS in a thread; also read ``ru_maxrss`` before and after."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.delta = max(self.peak - self.baseline, maxrss_after - self._maxrss_before, 0)


def run_case(args) -> dict:
    """Fit one estimator on one data set; return timings, likelihood and peak memory."""
    init = np.load(args.init)
    X = make_data(args.n_voxels, args.data)
    n = len(X)
    K = len(init["weights"])
    if args.engine == "segment":
        import warnings

        from segment import ConvergenceWarning, GaussianMixtureEM

        warnings.simplefilter("ignore", ConvergenceWarning)
        model = GaussianMixtureEM(
            K, max_iter=args.max_iter, tol=args.tol, sort_components=False,
            means_init=init["means"], covariances_init=init["covariances"],
            weights_init=init["weights"], scheduler="threads", n_workers=args.workers,
        )  # fmt: skip
        with PeakRSS() as memory:
            start = time.perf_counter()
            model.fit(X)
            seconds = time.perf_counter() - start
        log_likelihood = model.log_likelihood_
        extra = dict(path=model.fit_path_, converged=bool(model.converged_))
    else:
        import warnings

        from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        warnings.simplefilter("ignore", SkConvergenceWarning)
        model = GaussianMixture(
            K, covariance_type="full", tol=args.tol, reg_covar=args.reg_covar,
            max_iter=args.max_iter, means_init=init["means"],
            precisions_init=np.linalg.inv(init["covariances"]),
            weights_init=init["weights"], random_state=0,
        )  # fmt: skip
        with threadpool_limits(args.workers), PeakRSS() as memory:
            start = time.perf_counter()
            model.fit(X)
            seconds = time.perf_counter() - start
        # total log-likelihood of the final parameters (outside the timing). On a float64
        # copy: scikit-learn 1.9 scores integer input in an integer-typed buffer (truncated).
        log_likelihood = float(model.score(X.astype(np.float64)) * n)
        extra = dict(path="dense", converged=bool(model.converged_))
    return dict(
        engine=args.engine, data=args.data, n_voxels=n, seconds=seconds,
        n_iter=int(model.n_iter_), log_likelihood=float(log_likelihood),
        peak_mb=memory.delta / 2**20, data_mb=X.nbytes / 2**20,
        means=np.asarray(model.means_).ravel().tolist(), **extra,
    )  # fmt: skip


# ----------------------------------------------------------------------------- driver
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-voxels", type=int, default=9_000_000)
    parser.add_argument("--quick", action="store_true", help="1 M voxels")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tol", type=float, default=1e-4, help="nats per voxel, both libraries")
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--reg-covar", type=float, default=1e-6, help="scikit-learn only")
    parser.add_argument("--case", nargs=2, metavar=("ENGINE", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n_voxels = 1_000_000

    if args.case:  # child process: one fit, JSON on stdout
        args.engine, args.data = args.case
        print(json.dumps(run_case(args)))
        return

    print(
        f"{args.n_voxels:,} voxels, 6 classes, tol={args.tol:g} nats/voxel, "
        f"max_iter={args.max_iter}, workers={args.workers}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for data in ("float", "int"):
            start = time.perf_counter()
            init = initial_parameters(make_data(args.n_voxels, data))
            init_path = Path(tmp) / f"init_{data}.npz"
            np.savez(init_path, **init)
            print(f"[{data}] k-means init once: {time.perf_counter() - start:.1f} s", flush=True)
            for engine in ("segment", "sklearn"):
                command = [
                    sys.executable, __file__, "--case", engine, data, "--init", str(init_path),
                    "--n-voxels", str(args.n_voxels), "--workers", str(args.workers),
                    "--tol", str(args.tol), "--max-iter", str(args.max_iter),
                    "--reg-covar", str(args.reg_covar),
                ]  # fmt: skip
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode:
                    sys.exit(f"{engine}/{data} failed:\n{done.stderr}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(result)
                print(
                    f"[{data}] {engine:8s} {result['seconds']:.1f} s, {result['n_iter']} it",
                    flush=True,
                )
    print_table(results)


def print_table(results: list[dict]) -> None:
    header = (
        f"{'data':6s} {'engine':8s} {'path':16s} {'iters':>5s} {'s/iter':>7s} {'fit s':>7s} "
        f"{'log-likelihood':>17s} {'LL/voxel':>10s} {'peak MB':>8s} {'conv':>5s}"
    )
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['data']:6s} {r['engine']:8s} {r['path']:16s} {r['n_iter']:5d} "
            f"{r['seconds'] / r['n_iter']:7.3f} {r['seconds']:7.2f} "
            f"{r['log_likelihood']:17.6f} {r['log_likelihood'] / r['n_voxels']:10.6f} "
            f"{r['peak_mb']:8.1f} {str(r['converged']):>5s}"
        )
    print()
    sizes = {r["data"]: r["data_mb"] for r in results}
    print(f"peak MB = peak RSS of the fit above the baseline with the data loaded "
          f"(data: float64 {sizes['float']:.0f} MB, int16 {sizes['int']:.0f} MB)")  # fmt: skip
    for data in ("float", "int"):
        ours = next(r for r in results if r["engine"] == "segment" and r["data"] == data)
        theirs = next(r for r in results if r["engine"] == "sklearn" and r["data"] == data)
        rel = abs(ours["log_likelihood"] - theirs["log_likelihood"]) / abs(theirs["log_likelihood"])
        per_iter = (theirs["seconds"] / theirs["n_iter"]) / (ours["seconds"] / ours["n_iter"])
        mean_diff = np.max(np.abs(np.subtract(ours["means"], theirs["means"])))
        print(
            f"{data:6s} sklearn/segment: time per iter x{per_iter:.1f}, "
            f"total time x{theirs['seconds'] / ours['seconds']:.1f}, "
            f"peak memory x{theirs['peak_mb'] / max(ours['peak_mb'], 1e-9):.1f}; "
            f"relative LL difference {rel:.2e}; max |mean difference| {mean_diff:.3g}"
        )
    print(
        "segment checks the change after each M-step, scikit-learn the change of the lower "
        "bound of the previous parameters, so from the same sequence of iterates scikit-learn "
        "stops one M-step later."
    )


if __name__ == "__main__":
    main()
