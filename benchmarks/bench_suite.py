"""Benchmark suite: ``segment`` vs scikit-learn vs a dense numpy EM vs the nibabel I/O floor.

One command measures, side by side in one run, on generated head-like volumes of 1x, 2x and
8x the voxels of a 1 mm 197x233x189 head (integer- and float-valued):

* ``io-floor``     plain nibabel: load the input, ``nib.save`` a uint8 label map and a K-volume
                   float32 probability map (segment's own outputs, read before the clock starts);
* ``run``          ``segment run INPUT -o OUT --no-qc --overwrite -q`` end to end (console script);
* ``run+qc``       the same with the QC picture (its cost is the difference);
* ``run+spatial``  the same with ``--mrf --bias-field`` (issue 7: at most 3x ``run``);
* ``run-phases``   ``segment.api.segment_file`` in-process, with peak RSS per phase (load, fit,
                   predict, write, sidecar) to attribute memory;
* ``segment-fit``  ``GaussianMixtureEM.fit`` on the flattened voxels, 1 and 2 workers, each
                   run ``--fit-repeat`` times (default 3, worker counts alternating); the
                   fastest fit and the fastest seconds per iteration are kept, as ``timeit``
                   does: the 2 cores are shared with other work;
* ``sklearn-fit``  ``sklearn.mixture.GaussianMixture`` from segment's initial parameters;
* ``dense-fit``    a plain full-array textbook EM (in this file) from the same parameters.

Every case runs in a fresh subprocess; its peak RSS is the child's ``ru_maxrss`` from
``os.wait4``. Ratios are computed within the run. See ``benchmarks/README.md``.

Usage::

    python benchmarks/bench_suite.py --quick                  # small volumes, a few minutes
    python benchmarks/bench_suite.py                          # 1x and 2x
    python benchmarks/bench_suite.py --sizes 1 2 8 --out benchmarks/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
PYTHON = sys.executable
SEGMENT = str(Path(PYTHON).with_name("segment"))
BASE_SHAPE = (197, 233, 189)
K = 6
GENERATOR_VERSION = 2
#: Tissue classes of the generated head: name, mean, noise sd (uint8 intensity units, T1-like).
CLASSES = (
    ("background", 8.0, 4.0),
    ("skull", 35.0, 6.0),
    ("csf", 62.0, 7.0),
    ("gm", 105.0, 8.0),
    ("wm", 150.0, 8.0),
    ("fat", 200.0, 10.0),
)


# ============================================================================ data generation
def scaled_shape(scale: float) -> tuple[int, ...]:
    """The base head grid with ``scale`` times the voxels (each axis times scale**(1/3))."""
    factor = scale ** (1.0 / 3.0)
    return tuple(int(round(n * factor)) for n in BASE_SHAPE)


def make_head(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A cheap smooth 6-class head: nested perturbed ellipsoids, folded cortex, ventricles.

    Tissue boundaries are blended over about one voxel (partial volume), a smooth 10 %
    multiplicative field is applied and Gaussian noise added, so the classes overlap as in a
    real T1 and EM needs tens of iterations. Generated one x-slab at a time (no full-size
    float64 temporaries). Returns the float32 intensities (|signal + noise|, no repeated values
    in practice) and the same rounded to uint8. ``segment.samples.make_head_phantom`` is more
    realistic but takes ~45 s at 1x.
    """
    nx, ny, nz = shape
    m = {name: mean for name, mean, _ in CLASSES}
    v = np.linspace(-1, 1, ny, dtype=np.float32)[:, None]
    w = np.linspace(-1, 1, nz, dtype=np.float32)[None, :]
    width = 2.0 / max(shape)  # one voxel in normalised radius units
    out_f = np.empty(shape, np.float32)
    out_i = np.empty(shape, np.uint8)
    rng = np.random.default_rng(seed)

    def step(coordinate, threshold):  # 1 inside (coordinate < threshold), blended over ~1 voxel
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp((coordinate - threshold) / width))

    for i, u in enumerate(np.linspace(-1, 1, nx, dtype=np.float32)):
        r = np.sqrt((u / 0.92) ** 2 + (v / 0.95) ** 2 + ((w + 0.05) / 0.9) ** 2)
        r = (
            r
            + 0.03 * np.sin(3 * np.pi * u + 1) * np.sin(2 * np.pi * v + 2)
            + 0.02 * np.sin(4 * np.pi * w + 0.5)
        )
        fold = 0.07 * np.sin(9 * np.pi * u) * np.sin(8 * np.pi * v) * np.sin(7 * np.pi * w)
        ventricle = np.sqrt((u / 0.12) ** 2 + ((v + 0.05) / 0.3) ** 2 + ((w - 0.1) / 0.15) ** 2)
        signal = np.full(r.shape, m["background"], np.float32)
        signal += (m["fat"] - m["background"]) * step(r, 1.00)
        signal += (m["skull"] - m["fat"]) * step(r, 0.95)
        signal += (m["csf"] - m["skull"]) * step(r, 0.90)
        signal += (m["gm"] - m["csf"]) * step(r, 0.86)
        signal += (m["wm"] - m["gm"]) * step(r + fold, 0.62)
        signal += (m["csf"] - m["wm"]) * step(ventricle * 0.62, 0.62)
        signal *= 1.0 + 0.1 * np.sin(1.5 * u + 0.3) * np.cos(1.2 * v - 0.2) * np.cos(w)
        sd = np.where(r > 1.0, 5.0, 10.0).astype(np.float32)
        values = np.abs(signal + sd * rng.standard_normal(r.shape, np.float32))
        out_f[i] = values
        out_i[i] = np.clip(np.rint(values), 0, 255)
    return out_f, out_i


def volume_paths(scale: float, uncompressed_from: float) -> dict[str, Path]:
    ext = ".nii" if scale >= uncompressed_from else ".nii.gz"
    stem = f"head_v{GENERATOR_VERSION}_x{scale:g}"
    return {"int": CACHE / f"{stem}_uint8{ext}", "float": CACHE / f"{stem}_float32{ext}"}


def ensure_volumes(scale: float, uncompressed_from: float) -> dict[str, Path]:
    """Write (once, into benchmarks/.cache/) the uint8 and float32 volumes of one scale."""
    import nibabel as nib

    paths = volume_paths(scale, uncompressed_from)
    if all(p.exists() for p in paths.values()):
        return paths
    CACHE.mkdir(exist_ok=True)
    start = time.perf_counter()
    shape = scaled_shape(scale)
    data_f, data_i = make_head(shape)
    affine = np.diag([1.0 / scale ** (1 / 3)] * 3 + [1.0])
    for kind, data in (("int", data_i), ("float", data_f)):
        tmp = paths[kind].with_name(".tmp_" + paths[kind].name)
        nib.save(nib.Nifti1Image(data, affine), tmp)
        os.replace(tmp, paths[kind])
    log(
        f"generated {shape} = {np.prod(shape) / 1e6:.1f} M voxels in "
        f"{time.perf_counter() - start:.1f} s -> {paths['int'].name}, {paths['float'].name}"
    )
    return paths


# ============================================================================ measuring helpers
class RSSSampler:
    """Sample this process's RSS every few ms; peak overall and per named phase."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self.baseline = self.rss()

    def rss(self) -> float:
        return self._process.memory_info().rss / 2**20

    def mark(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def sample(self) -> None:
        value = self.rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), value)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak(self) -> float:
        return max(self.peaks.values())


def mark_phase(memory: RSSSampler, owner, name: str, label: str) -> None:
    """Wrap ``owner.name`` so that ``memory`` attributes its RSS to ``label`` while it runs."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        previous = memory.phase
        memory.mark(label)
        try:
            return original(*args, **kwargs)
        finally:
            memory.mark(previous)

    setattr(owner, name, wrapped)


def busy_cores(seconds: float = 1.0) -> float:
    """CPU cores busy (all users) over ``seconds``, from /proc/stat; we are idle meanwhile."""

    def read():
        fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    return (1 - (idle1 - idle0) / max(total1 - total0, 1e-9)) * (os.cpu_count() or 1)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_features(path: str, dtype: str | None = None) -> np.ndarray:
    """(N, 1) features of a NIfTI in the scan's own dtype (or ``dtype``), all voxels."""
    import nibabel as nib

    data = np.asanyarray(nib.load(path).dataobj)
    X = np.asarray(data).reshape(-1, 1)
    return X.astype(dtype) if dtype else X


# ============================================================================ child cases
def case_init(opts) -> dict:
    """segment's own initial parameters, by segment's own code path (see README)."""
    from segment import GaussianMixtureEM, _validation
    from segment._scheduler import compute_kwargs
    from segment.mixture import RELATIVE_VARIANCE_FLOOR

    X = load_features(opts["input"])
    est = GaussianMixtureEM(K, tol=opts["tol"])
    est.validate_parameters()
    X = _validation.check_features(X)
    start = time.perf_counter()
    with compute_kwargs(None, None) as ckw:
        data = est._prepare(X, None, ckw)
        floor = RELATIVE_VARIANCE_FLOOR * data.moments["m2"] / data.moments["n"]
        weights, means, covariances = est._initial_parameters(data, (None, None, None), floor, ckw)
    seconds = time.perf_counter() - start
    np.savez(opts["init_out"], weights=weights, means=means, covariances=covariances,
             floor=floor)  # fmt: skip
    return {"fit_s": seconds, "path": data.path, "means": means.ravel().tolist()}


def case_segment_fit(opts) -> dict:
    """GaussianMixtureEM.fit on (N, 1) voxels with its own k-means initialisation."""
    import warnings

    from segment import ConvergenceWarning, GaussianMixtureEM

    X = load_features(opts["input"])
    stamps: list[float] = []
    est = GaussianMixtureEM(
        K, tol=opts["tol"], max_iter=opts["max_iter"], scheduler="threads",
        n_workers=opts["workers"], callback=lambda *a: stamps.append(time.perf_counter()),
    )  # fmt: skip
    warnings.simplefilter("ignore", ConvergenceWarning)
    with RSSSampler() as memory:
        memory.mark("fit")
        start = time.perf_counter()
        est.fit(X)
        seconds = time.perf_counter() - start
    per_iter = np.diff([start] + stamps)
    return {
        "fit_s": seconds, "n_iter": int(est.n_iter_), "converged": bool(est.converged_),
        "s_per_iter": float(np.median(per_iter[1:])) if len(per_iter) > 1 else float(seconds),
        "first_iter_s": float(per_iter[0]),
        "ll": float(est.log_likelihood_), "n": float(est.n_samples_),
        "ll0": float(est.initial_log_likelihood_), "path": est.fit_path_,
        "fit_delta_mb": memory.peak - memory.baseline, "means": est.means_.ravel().tolist(),
    }  # fmt: skip


def case_sklearn_fit(opts) -> dict:
    """scikit-learn GaussianMixture from segment's initial parameters, float64 input."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    init = np.load(opts["init"])
    X = load_features(opts["input"], "float64")
    model = GaussianMixture(
        K, covariance_type="full", tol=opts["tol"], reg_covar=opts["reg_covar"],
        max_iter=opts["max_iter"], weights_init=init["weights"], means_init=init["means"],
        precisions_init=np.linalg.inv(init["covariances"]), random_state=0,
    )  # fmt: skip
    stamps: list[float] = []
    m_step = model._m_step

    def timed_m_step(*args, **kwargs):
        stamps.append(time.perf_counter())
        return m_step(*args, **kwargs)

    model._m_step = timed_m_step
    warnings.simplefilter("ignore", ConvergenceWarning)
    with RSSSampler() as memory:
        memory.mark("fit")
        start = time.perf_counter()
        model.fit(X)
        seconds = time.perf_counter() - start
    ll = float(model.score(X)) * len(X)  # outside the clock
    per_iter = np.diff(stamps)
    return {
        "fit_s": seconds, "n_iter": int(model.n_iter_), "converged": bool(model.converged_),
        "s_per_iter": float(np.median(per_iter)) if len(per_iter) else float(seconds),
        "ll": ll, "n": float(len(X)), "path": "dense (sklearn)",
        "fit_delta_mb": memory.peak - memory.baseline,
        "means": np.sort(model.means_.ravel()).tolist(),
    }  # fmt: skip


def dense_em(X, weights, means, covariances, floor, tol, max_iter):
    """Plain textbook EM on full (N, K) arrays, stopping rule as segment's.

    E-step ``r_nk ∝ pi_k N(x_n|mu_k, Sigma_k)`` (log-sum-exp), M-step ``N_k = sum_n r_nk``,
    ``mu_k = sum_n r_nk x_n / N_k``, ``Sigma_k = sum_n r_nk (x_n-mu_k)(x_n-mu_k)^T / N_k``,
    ``pi_k = N_k / N``; variances floored at ``floor`` (D = 1 here, as segment's default).
    Stops when the log-likelihood per voxel changes by less than ``tol`` after an M-step.
    """
    n, d = X.shape

    def e_step(weights, means, covariances):
        chol = np.linalg.cholesky(covariances)  # (K, D, D), Sigma_k = L_k L_k^T
        chol_inv = np.linalg.inv(chol)  # (K, D, D)
        diff = X[:, None, :] - means[None, :, :]  # (N, K, D)
        solved = np.einsum("ked,nkd->nke", chol_inv, diff)  # L_k^-1 (x_n - mu_k)
        log_det = 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        log_prob = -0.5 * ((solved**2).sum(axis=2) + log_det + d * np.log(2 * np.pi))
        weighted = log_prob + np.log(weights)  # (N, K)
        peak = weighted.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(weighted - peak).sum(axis=1, keepdims=True)) + peak
        return np.exp(weighted - log_norm), float(log_norm.sum())

    resp, ll = e_step(weights, means, covariances)
    ll0, stamps, converged = ll, [time.perf_counter()], False
    for iteration in range(1, max_iter + 1):
        nk = resp.sum(axis=0) + 10 * np.finfo(float).eps
        means = resp.T @ X / nk[:, None]
        diff = X[:, None, :] - means[None, :, :]
        covariances = np.einsum("nk,nkd,nke->kde", resp, diff, diff) / nk[:, None, None]
        if d == 1:
            covariances = np.maximum(covariances, floor[0])
        weights = nk / n
        resp, new_ll = e_step(weights, means, covariances)
        stamps.append(time.perf_counter())
        change, ll = (new_ll - ll) / n, new_ll
        if abs(change) < tol:
            converged = True
            break
    return means, ll, ll0, iteration, converged, np.diff(stamps)


def case_dense_fit(opts) -> dict:
    init = np.load(opts["init"])
    X = load_features(opts["input"], "float64")
    with RSSSampler() as memory:
        memory.mark("fit")
        start = time.perf_counter()
        means, ll, ll0, n_iter, converged, per_iter = dense_em(
            X, init["weights"], init["means"], init["covariances"], init["floor"],
            opts["tol"], opts["max_iter"],
        )  # fmt: skip
        seconds = time.perf_counter() - start
    return {
        "fit_s": seconds, "n_iter": n_iter, "converged": converged,
        "s_per_iter": float(np.median(per_iter)), "ll": ll, "ll0": ll0, "n": float(len(X)),
        "path": "dense (numpy)", "fit_delta_mb": memory.peak - memory.baseline,
        "means": np.sort(means.ravel()).tolist(),
    }  # fmt: skip


def case_io_floor(opts) -> dict:
    """nibabel load of the input + nib.save of segment's own dseg and probseg arrays."""
    import nibabel as nib

    dseg = np.asanyarray(nib.load(opts["dseg"]).dataobj)  # before the clock
    prob = np.asanyarray(nib.load(opts["probseg"]).dataobj)
    assert dseg.dtype == np.uint8 and prob.dtype == np.float32, (dseg.dtype, prob.dtype)
    out = Path(opts["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if opts["dseg"].endswith(".gz") else ".nii"  # as segment wrote them
    with RSSSampler() as memory:
        memory.mark("io")
        start = time.perf_counter()
        img = nib.load(opts["input"])
        data = np.asanyarray(img.dataobj)
        loaded = time.perf_counter()
        # header=None: nibabel takes the dtype from the array (the input's header would
        # silently cast the probabilities to the input's uint8).
        nib.save(nib.Nifti1Image(dseg, img.affine), out / f"floor_dseg{suffix}")
        nib.save(nib.Nifti1Image(prob, img.affine), out / f"floor_probseg{suffix}")
        seconds = time.perf_counter() - start
    del data
    for name, dtype in (("dseg", np.uint8), ("probseg", np.float32)):
        written = nib.load(out / f"floor_{name}{suffix}").get_data_dtype()
        assert written == dtype, (name, written)
    return {"fit_s": None, "load_s": loaded - start, "io_s": seconds,
            "fit_delta_mb": memory.peak - memory.baseline}  # fmt: skip


def case_run_phases(opts) -> dict:
    """segment_file in-process with peak RSS per phase (load, fit, predict, write...)."""
    import warnings

    from segment import api, io, mixture, qc, sidecar

    memory = RSSSampler()

    def phase(owner, name, label):
        mark_phase(memory, owner, name, label)

    phase(io, "load_scan", "load")
    phase(mixture.GaussianMixtureEM, "fit", "fit")
    phase(mixture.GaussianMixtureEM, "predict_with_proba", "predict")
    phase(io, "write_labels", "write dseg")
    phase(io, "write_probabilities", "write probseg")
    phase(qc, "write_qc", "qc")
    phase(sidecar, "build_sidecar", "sidecar")
    warnings.simplefilter("ignore")
    with memory:
        memory.mark("other")
        start = time.perf_counter()
        result = api.segment_file(
            opts["input"], opts["out_dir"], overwrite=True, qc=False, tol=opts["tol"],
            workers=opts["workers"],
        )  # fmt: skip
        seconds = time.perf_counter() - start
    est = result.estimator
    return {
        "fit_s": result.timings.get("fit_s"), "e2e_s": seconds, "n_iter": int(est.n_iter_),
        "ll": float(est.log_likelihood_), "n": float(est.n_samples_), "path": est.fit_path_,
        "timings": result.timings, "phase_peaks_mb": memory.peaks, "baseline_mb": memory.baseline,
    }  # fmt: skip


CASES = {
    "init": case_init, "segment-fit": case_segment_fit, "sklearn-fit": case_sklearn_fit,
    "dense-fit": case_dense_fit, "io-floor": case_io_floor, "run-phases": case_run_phases,
}  # fmt: skip


# ============================================================================ parent: running cases
def run_child(command: list[str], env_extra: dict | None = None) -> dict:
    """Run one command in a fresh process; wall time, CPU time and peak RSS (ru_maxrss)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "stdout": stdout,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def run_case(name: str, opts: dict, env_extra: dict | None = None) -> dict:
    command = [PYTHON, __file__, "--child", name, "--child-opts", json.dumps(opts)]
    measured = run_child(command, env_extra)
    result = json.loads(measured.pop("stdout").strip().splitlines()[-1])
    return {**measured, **result}


def run_cli(input_path: Path, out_dir: Path, qc: bool, opts: dict, extra=()) -> dict:
    command = [SEGMENT, "run", str(input_path), "-o", str(out_dir), "--overwrite", "-q",
               "--tol", str(opts["tol"]), "--workers", str(opts["workers"]), *extra]  # fmt: skip
    if not qc:
        command.append("--no-qc")
    measured = run_child(command)
    measured.pop("stdout")
    record = json.loads(next(out_dir.glob("*_segment.json")).read_text())
    model = record["model"]
    return {
        **measured, "fit_s": record["timings_s"].get("fit_s"), "n_iter": model["n_iter"],
        "ll": model["log_likelihood"], "n": model["n_voxels_fitted"], "path": model["fit_path"],
        "timings": record["timings_s"], "converged": model["converged"],
    }  # fmt: skip


def measured(fn, label: str, max_busy: float):
    """Run ``fn()`` after checking that the machine is quiet; repeat once if it was not."""
    busy = busy_cores(0.5)
    load = os.getloadavg()[0]
    result = fn()
    result.update(busy=busy, load1=load)
    if busy > max_busy:
        log(f"  {label}: {busy:.2f} cores busy before the case; waiting and re-running")
        time.sleep(10)
        busy2 = busy_cores(0.5)
        again = fn()
        again.update(busy=busy2, load1=os.getloadavg()[0], rerun=True)
        if again["wall_s"] < result["wall_s"]:
            result = again
    return result


# ============================================================================ parent: the suite
def machine_info() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    import nibabel
    import sklearn

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"nproc {os.cpu_count()}, RAM {ram:.1f} GiB, {cpu}; Python {platform.python_version()}, "
        f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, nibabel "
        f"{nibabel.__version__}; load average at start {load}"
    )


def run_suite(args) -> tuple[list[dict], list[str]]:
    """Every case of every scale and dtype; the outputs (12 GB at 8x) are removed at the end."""
    work = Path(tempfile.mkdtemp(prefix="bench_suite_"))
    try:
        return _run_cases(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_cases(args, work: Path) -> tuple[list[dict], list[str]]:
    rows: list[dict] = []
    notes: list[str] = []
    common = {"tol": args.tol, "max_iter": args.max_iter, "reg_covar": args.reg_covar}
    for scale in args.sizes:
        paths = ensure_volumes(scale, args.uncompressed_from)
        for dtype in args.dtypes:
            input_path = paths[dtype]
            tag = f"x{scale:g} {dtype}"
            base = {"scale": scale, "dtype": dtype}

            def add(case, workers, result):
                rows.append({**base, "case": case, "workers": workers, **result})
                r = rows[-1]
                if args.rows_out:  # one JSON line per case, so a partial run is not lost
                    with open(args.rows_out, "a") as stream:
                        stream.write(json.dumps(r) + "\n")
                log(
                    f"  {tag} {case:12s} w={workers}: wall {r['wall_s']:.2f} s, "
                    f"fit {r.get('fit_s') or 0:.2f} s, peak {r['peak_rss_mb']:.0f} MB"
                )

            log(f"{tag}: {input_path.name}")
            out = work / f"{scale:g}_{dtype}"
            init_path = work / f"init_{scale:g}_{dtype}.npz"
            init = run_case("init", {"input": str(input_path), "init_out": str(init_path),
                                     **common})  # fmt: skip
            log(f"  {tag} init (segment k-means path '{init['path']}'): {init['fit_s']:.2f} s")
            run_opts = {**common, "workers": args.workers}
            add(
                "run",
                args.workers,
                measured(
                    lambda: run_cli(input_path, out / "run", False, run_opts), "run", args.max_busy
                ),
            )
            if not args.skip_qc:
                add("run+qc", args.workers, measured(
                    lambda: run_cli(input_path, out / "runqc", True, run_opts), "run+qc",
                    args.max_busy))  # fmt: skip
            if scale <= args.spatial_up_to:  # issue 7: MRF + bias field, same scan, options
                add("run+spatial", args.workers, measured(
                    lambda: run_cli(input_path, out / "spatial", False, run_opts,
                                    ("--mrf", "--bias-field")),
                    "run+spatial", args.max_busy))  # fmt: skip
            floor_opts = {
                "input": str(input_path), "out_dir": str(out / "floor"),
                "dseg": str(next((out / "run").glob("*_dseg.nii*"))),
                "probseg": str(next((out / "run").glob("*_probseg.nii*"))),
            }  # fmt: skip
            add("io-floor", "-", measured(lambda: run_case("io-floor", floor_opts), "io-floor",
                                          args.max_busy))  # fmt: skip
            if args.phases:
                add("run-phases", args.workers, measured(lambda: run_case("run-phases", {
                    "input": str(input_path), "out_dir": str(out / "phases"), **run_opts}),
                    "run-phases", args.max_busy))  # fmt: skip
            fastest: dict[int, dict] = {}  # best of --fit-repeat runs, worker counts alternating
            for _ in range(args.fit_repeat):
                for workers in args.fit_workers:
                    env = {v: str(workers) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                     "MKL_NUM_THREADS")}  # fmt: skip
                    fit_opts = {"input": str(input_path), "workers": workers, **common}
                    result = measured(lambda: run_case("segment-fit", fit_opts, env),
                                      "segment-fit", args.max_busy)  # fmt: skip
                    previous = fastest.get(workers) or {}
                    runs = [*previous.get("fit_runs", []), result["fit_s"]]
                    per_iter = [*previous.get("s_per_iter_runs", []), result["s_per_iter"]]
                    if not previous or result["fit_s"] < previous["fit_s"]:
                        fastest[workers] = result
                    # each timing is its own best: the fastest fit, the fastest iterations
                    fastest[workers].update(fit_runs=runs, s_per_iter_runs=per_iter,
                                            s_per_iter=min(per_iter))  # fmt: skip
            for workers in args.fit_workers:
                add("segment-fit", workers, fastest[workers])
            ref_opts = {"input": str(input_path), "init": str(init_path), **common}
            if scale <= args.skip_sklearn_above:
                add(
                    "sklearn-fit",
                    "all",
                    measured(lambda: run_case("sklearn-fit", ref_opts), "sklearn", args.max_busy),
                )
                # the same number of M-steps as scikit-learn (tol 0), for the likelihood check
                same_opts = {**common, "input": str(input_path), "workers": args.workers,
                             "tol": 0.0, "max_iter": rows[-1]["n_iter"]}  # fmt: skip
                add(
                    "segment-fit@sk-iters",
                    args.workers,
                    measured(
                        lambda: run_case("segment-fit", same_opts), "segment-fit", args.max_busy
                    ),
                )
            else:
                notes.append(f"scikit-learn skipped at x{scale:g} (--skip-sklearn-above)")
            if scale <= args.skip_dense_above:
                add(
                    "dense-fit",
                    "all",
                    measured(lambda: run_case("dense-fit", ref_opts), "dense", args.max_busy),
                )
            else:
                notes.append(f"dense numpy EM skipped at x{scale:g} (--skip-dense-above)")
    return rows, notes


# ============================================================================ report
def fmt(value, spec=".2f", missing="–"):
    return missing if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    head = ("| case | scale | dtype | workers | wall s | fit s | iterations | s/iter | "
            "final log-lik / voxel | peak RSS MB | fit ΔRSS MB | busy cores |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        ll = r.get("ll")
        per_voxel = None if ll is None else ll / r["n"]
        wall = r.get("io_s") if r["case"] == "io-floor" else r["wall_s"]
        lines.append(
            f"| {r['case']} | {r['scale']:g}× | {r['dtype']} | {r['workers']} | "
            f"{fmt(wall)} | {fmt(r.get('fit_s'))} | {r.get('n_iter', '–')} | "
            f"{fmt(r.get('s_per_iter'), '.4f')} | {fmt(per_voxel, '.7f')} | "
            f"{r['peak_rss_mb']:.0f} | {fmt(r.get('fit_delta_mb'), '.0f')} | "
            f"{r['busy']:.2f}{' (re-run)' if r.get('rerun') else ''} |"
        )
    return "\n".join(lines)


def find(rows, case, scale, dtype, workers=None):
    for r in rows:
        if (r["case"], r["scale"], r["dtype"]) == (case, scale, dtype) and (
            workers is None or r["workers"] == workers
        ):
            return r
    return None


def ratios(rows: list[dict], args) -> str:
    out = []
    for scale in args.sizes:
        for dtype in args.dtypes:
            tag = f"{scale:g}× {dtype}"
            seg = {w: find(rows, "segment-fit", scale, dtype, w) for w in args.fit_workers}
            best = min((r for r in seg.values() if r), key=lambda r: r["fit_s"], default=None)
            sk = find(rows, "sklearn-fit", scale, dtype)
            dense = find(rows, "dense-fit", scale, dtype)
            if best and sk:
                rel = abs(best["ll"] - sk["ll"]) / abs(sk["ll"])
                out.append(
                    f"- {tag}: sklearn fit / segment fit (best: {best['workers']} worker(s)) = "
                    f"**{sk['fit_s'] / best['fit_s']:.1f}×** (target ≥ 30×); per iteration "
                    f"segment / sklearn = **{best['s_per_iter'] / sk['s_per_iter']:.3g}** "
                    f"(target ≤ 0.333 for float); |ΔLL|/|LL| = {rel:.1e} (target ≤ 1e-6); "
                    f"iterations {best['n_iter']} vs {sk['n_iter']}"
                )
            same = find(rows, "segment-fit@sk-iters", scale, dtype)
            if same and sk:
                rel = abs(same["ll"] - sk["ll"]) / abs(sk["ll"])
                out.append(
                    f"- {tag}: after the same {same['n_iter']} M-steps (segment tol 0), "
                    f"|ΔLL|/|LL| segment vs sklearn = **{rel:.1e}** (target ≤ 1e-6)"
                )
            if best and dense:
                rel = abs(best["ll"] - dense["ll"]) / abs(dense["ll"])
                out.append(
                    f"- {tag}: dense numpy EM fit / segment fit = "
                    f"{dense['fit_s'] / best['fit_s']:.1f}×; |ΔLL|/|LL| = {rel:.1e}; "
                    f"iterations {best['n_iter']} vs {dense['n_iter']}"
                )
            if seg.get(1) and seg.get(2):
                runs = "; ".join(
                    f"{w} worker(s): "
                    + ", ".join(f"{t:.3f}" for t in seg[w].get("fit_runs", []))
                    + " (s/iter "
                    + ", ".join(f"{t:.4f}" for t in seg[w].get("s_per_iter_runs", []))
                    + ")"
                    for w in (1, 2)
                )
                out.append(
                    f"- {tag}: 1-worker / 2-worker fit = "
                    f"**{seg[1]['fit_s'] / seg[2]['fit_s']:.2f}×**, per iteration "
                    f"{seg[1]['s_per_iter'] / seg[2]['s_per_iter']:.2f}× "
                    f"(target ≥ 1.7× for float; fastest of the fits, s: {runs})"
                )
            run = find(rows, "run", scale, dtype)
            floor = find(rows, "io-floor", scale, dtype)
            qc = find(rows, "run+qc", scale, dtype)
            if run and floor:
                out.append(
                    f"- {tag}: `segment run` / I/O floor = {run['wall_s']:.2f} / "
                    f"{floor['io_s']:.2f} s = **{run['wall_s'] / floor['io_s']:.2f}×** "
                    f"(target ≤ 2×); vs the floor's whole process incl. Python start-up and "
                    f"imports ({floor['wall_s']:.2f} s): {run['wall_s'] / floor['wall_s']:.2f}×; "
                    f"segment's own timings: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in run["timings"].items())
                )
            spatial = find(rows, "run+spatial", scale, dtype)
            if run and spatial:
                out.append(
                    f"- {tag}: `segment run --mrf --bias-field` / `segment run` = "
                    f"{spatial['wall_s']:.2f} / {run['wall_s']:.2f} s = "
                    f"**{spatial['wall_s'] / run['wall_s']:.2f}×** (target ≤ 3×); fit "
                    f"{spatial['fit_s']:.2f} / {run['fit_s']:.2f} s; peak RSS "
                    f"{spatial['peak_rss_mb']:.0f} MB vs {run['peak_rss_mb']:.0f} MB"
                )
            if run and qc:
                out.append(
                    f"- {tag}: QC picture cost = {qc['wall_s'] - run['wall_s']:+.2f} s wall "
                    f"(qc_s in sidecar {qc['timings'].get('qc_s', float('nan')):.2f} s)"
                )
            if run:
                limit = 1024 if scale <= 2 else 1536
                verdict = "met" if run["peak_rss_mb"] <= limit else "MISSED"
                out.append(
                    f"- {tag}: `segment run` peak RSS {run['peak_rss_mb']:.0f} MB vs "
                    f"{limit} MB target: {verdict}"
                )
            phases = find(rows, "run-phases", scale, dtype)
            if phases:
                peaks = ", ".join(f"{k} {v:.0f}" for k, v in phases["phase_peaks_mb"].items())
                out.append(f"- {tag}: peak RSS by phase (MB, in-process segment_file): {peaks}")
    one = {d: find(rows, "run", 1, d) for d in args.dtypes}
    eight = {d: find(rows, "run", 8, d) for d in args.dtypes}
    for d in args.dtypes:
        if one[d] and eight[d]:
            out.append(
                f"- scale {d}: 8× run / (8 × 1× run) = {eight[d]['wall_s']:.1f} / "
                f"{8 * one[d]['wall_s']:.1f} = **{eight[d]['wall_s'] / (8 * one[d]['wall_s']):.2f}"
                "** (target ≤ 1.2)"
            )
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="scale 0.125 only (~1.1 M voxels)")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--dtypes", nargs="+", default=["int", "float"], choices=["int", "float"])
    parser.add_argument("--skip-sklearn-above", type=float, default=2.0)
    parser.add_argument("--skip-dense-above", type=float, default=2.0)
    parser.add_argument(
        "--uncompressed-from",
        type=float,
        default=8.0,
        help="scales >= this are written as uncompressed .nii",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers of `segment run`")
    parser.add_argument("--fit-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--fit-repeat",
        type=int,
        default=3,
        help="runs of each segment-fit case, worker counts alternating; the fastest is kept",
    )
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=500)
    parser.add_argument("--reg-covar", type=float, default=1e-6, help="scikit-learn only")
    parser.add_argument(
        "--max-busy",
        type=float,
        default=0.5,
        help="re-run a case once if more cores than this were busy before it",
    )
    parser.add_argument("--no-phases", dest="phases", action="store_false")
    parser.add_argument("--skip-qc", action="store_true")
    parser.add_argument(
        "--spatial-up-to",
        type=float,
        default=2.0,
        help="run `segment run --mrf --bias-field` up to this scale (0: never; 8 adds about "
        "2 min per dtype)",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--rows-out", type=Path, help="append each case as a JSON line here")
    parser.add_argument(
        "--report-from",
        type=Path,
        nargs="+",
        help="print the report of saved --rows-out files instead of measuring",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-opts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CASES[args.child](json.loads(args.child_opts))))
        return
    if args.quick:
        args.sizes = [0.125]
    info = machine_info()
    start = time.perf_counter()
    if args.report_from:
        rows = [json.loads(line) for path in args.report_from
                for line in path.read_text().splitlines() if line.strip()]  # fmt: skip
        args.sizes = sorted({r["scale"] for r in rows})
        args.dtypes = [d for d in ("int", "float") if any(r["dtype"] == d for r in rows)]
        notes = [f"report assembled from {', '.join(str(p) for p in args.report_from)}"]
    else:
        log(info)
        rows, notes = run_suite(args)
    report = "\n\n".join([
        f"Machine: {info}; load average at end "
        + " ".join(f"{x:.2f}" for x in os.getloadavg()),
        f"Settings: K={K}, tol={args.tol:g} nats/voxel (all engines), max_iter={args.max_iter}, "
        f"reg_covar={args.reg_covar:g} (sklearn), `segment run --workers {args.workers}`; "
        f"suite took {time.perf_counter() - start:.0f} s",
        table(rows),
        "Ratios (within this run):\n\n" + ratios(rows, args),
        *(["Notes: " + "; ".join(notes)] if notes else []),
    ])  # fmt: skip
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
