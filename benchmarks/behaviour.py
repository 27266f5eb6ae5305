"""Record the package's outputs on the sample scans, and compare two recordings.

Used to show that a refactor changes nothing: record on the old tree, record on the new one,
compare. The package recorded is the one on ``PYTHONPATH`` (the CLI cases run
``python -m segment`` in a subprocess with the same environment).

    PYTHONPATH=/path/to/tree python benchmarks/behaviour.py record OUTDIR
    python benchmarks/behaviour.py compare OUTDIR_A OUTDIR_B

``record`` writes OUTDIR/<case>/ (the raw outputs) and OUTDIR/<case>.npz (the arrays: labels
under keys ending in ``dseg``/``labels``, everything else float), plus OUTDIR/timings.json.
``compare`` requires identical labels and floats within 1e-6 (absolute), prints one row per
array and exits 1 if any disagrees or is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_scans"
TOLERANCE = 1e-6

HEAD = str(SAMPLES / "head_t1.nii.gz")
NOISY = str(SAMPLES / "head_t1_noisy.nii.gz")
BRAIN_MASK = str(SAMPLES / "head_t1_brainmask.nii.gz")
SLICE = str(SAMPLES / "head_slice.png")

# name -> arguments of `segment run` (the output folder is added)
RUN_CASES = {
    "plain": [HEAD, "-k", "6"],
    "mrf": [HEAD, "-k", "6", "--mrf"],
    "bias": [HEAD, "-k", "6", "--bias-field", "--write-corrected"],
    "preset_head": [NOISY, "-p", "t1-head-6class", "--write-corrected"],
    "preset_brain": [HEAD, "-p", "t1-brain-3class", "--mask", BRAIN_MASK],
    "slice_2d": [SLICE, "-k", "3", "--mrf"],
    "pve": [HEAD, "-k", "6", "--mask", BRAIN_MASK, "--pve"],
    "streamed": [HEAD, "-k", "4", "--mrf", "--memory-limit", "60MB"],
}


def _python() -> str:
    return sys.executable


def _run(args: list[str]) -> None:
    result = subprocess.run(
        [_python(), "-m", "segment", "run", *args, "-q", "--no-qc", "--overwrite"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if result.returncode != 0:
        raise SystemExit(f"segment {' '.join(args)} failed:\n{result.stderr}")


def _load(path: Path) -> np.ndarray:
    name = path.name
    if name.endswith((".nii.gz", ".nii")):
        import nibabel as nib

        return np.asarray(nib.load(path).dataobj)
    if name.endswith((".tif", ".tiff")):
        import tifffile

        return np.asarray(tifffile.imread(path))
    from PIL import Image

    return np.asarray(Image.open(path))


def _key(path: Path, folder: Path) -> str:
    rel = str(path.relative_to(folder))
    for ext in (".nii.gz", ".nii", ".png", ".tiff", ".tif"):
        if rel.endswith(ext):
            return rel[: -len(ext)].replace("/", "__")
    return rel.replace("/", "__")


def _collect(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.endswith((".nii.gz", ".nii", ".png", ".tif", ".tiff")):
            if not path.name.endswith("_qc.png"):
                arrays[_key(path, folder)] = _load(path)
    return arrays


def _python_cases(out: Path) -> dict[str, dict[str, np.ndarray]]:
    """The estimator itself: a flat feature array, and the image model on the head volume."""
    import nibabel as nib

    from segment import GaussianMixtureEM

    data = np.asarray(nib.load(HEAD).dataobj, dtype=np.float64)
    cases = {}
    X = data.reshape(-1, 1)[::7]
    gm = GaussianMixtureEM(4, random_state=0).fit(X)
    cases["python_flat"] = {
        "labels": gm.predict(X),
        "proba": gm.predict_proba(X),
        "means": gm.means_,
        "covariances": gm.covariances_,
        "weights": gm.weights_,
        "score": np.array([gm.score(X)]),
    }
    labels, proba = gm.predict_with_proba(X)
    cases["python_flat"].update(both_labels=labels, both_proba=proba)
    try:
        from segment import SpatialGaussianMixture as Model  # after the refactor
    except ImportError:
        Model = GaussianMixtureEM
    noisy = np.asarray(nib.load(NOISY).dataobj, dtype=np.float64)
    mask = np.asarray(nib.load(BRAIN_MASK).dataobj) > 0
    for name, model, image, region in [
        ("python_image", Model(6, mrf_beta=0.2, bias_field=True), noisy, None),
        ("python_compat", GaussianMixtureEM(3, mrf_beta=0.3, bias_field=True), data, mask),
    ]:
        model.fit_image(image, region, spacing=(1.0, 1.0, 1.0))
        proba = model.responsibilities_
        arrays = {"labels": np.argmax(proba, axis=1), "proba": proba, "means": model.means_}
        if model.bias_field_ is not None:
            arrays["field"] = model.bias_field_
        cases[name] = arrays
    return cases


def record(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    timings = {}
    for name, args in RUN_CASES.items():
        folder = outdir / name
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        _run([*args, "-o", str(folder)])
        timings[name] = time.perf_counter() - start
        np.savez_compressed(outdir / f"{name}.npz", **_collect(folder))
        print(f"{name:14s} {timings[name]:7.1f} s", flush=True)

    # a batch over a small folder (two scans)
    folder = outdir / "batch"
    shutil.rmtree(folder, ignore_errors=True)
    scans = outdir / "batch_in"
    shutil.rmtree(scans, ignore_errors=True)
    scans.mkdir()
    shutil.copy(HEAD, scans / "a.nii.gz")
    shutil.copy(NOISY, scans / "b.nii.gz")
    start = time.perf_counter()
    result = subprocess.run(
        [_python(), "-m", "segment", "batch", str(scans), "-o", str(folder), "-k", "4",
         "--mrf", "--jobs", "2", "--no-qc", "-q"],
        capture_output=True, text=True, env=os.environ.copy(),
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"segment batch failed:\n{result.stderr}")
    timings["batch"] = time.perf_counter() - start
    np.savez_compressed(outdir / "batch.npz", **_collect(folder))
    print(f"{'batch':14s} {timings['batch']:7.1f} s", flush=True)

    start = time.perf_counter()
    for name, arrays in _python_cases(outdir).items():
        np.savez_compressed(outdir / f"{name}.npz", **arrays)
    timings["python"] = time.perf_counter() - start
    print(f"{'python':14s} {timings['python']:7.1f} s", flush=True)
    (outdir / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")


def _is_label(key: str) -> bool:
    return key.endswith(("dseg", "labels"))


def compare(a: Path, b: Path) -> int:
    failures = 0
    print(f"{'case':14s} {'array':40s} {'shape':>16s} {'max |diff|':>11s}  result")
    for npz in sorted(a.glob("*.npz")):
        other = b / npz.name
        if not other.exists():
            print(f"{npz.stem:14s} {'(missing in B)':40s}")
            failures += 1
            continue
        with np.load(npz) as left, np.load(other) as right:
            for key in sorted(set(left.files) | set(right.files)):
                if key not in left.files or key not in right.files:
                    print(f"{npz.stem:14s} {key:40s} {'':>16s} {'':>11s}  MISSING")
                    failures += 1
                    continue
                x, y = left[key], right[key]
                if x.shape != y.shape:
                    ok, diff = False, float("nan")
                elif _is_label(key):
                    diff = float(np.count_nonzero(x != y))
                    ok = diff == 0
                else:
                    diff = float(np.max(np.abs(x.astype(np.float64) - y), initial=0.0))
                    ok = diff <= TOLERANCE
                failures += not ok
                label = "labels" if _is_label(key) else "floats"
                print(f"{npz.stem:14s} {key:40s} {str(x.shape):>16s} {diff:11.3g}  "
                      f"{'ok' if ok else 'DIFFERS'} ({label})")  # fmt: skip
    print("all agree" if failures == 0 else f"{failures} arrays differ")
    return 1 if failures else 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "record":
        record(Path(argv[1]))
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        return compare(Path(argv[1]), Path(argv[2]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
