"""Realistic accuracy benchmark: partial-volume phantoms and the ICBM152 T1, segment vs peers.

Cases (see :mod:`phantoms`):

* ``pv-nN-fF`` -- the partial-volume phantom at N % noise (0, 3, 5, 7, 9) and an F % smooth
  random field (0, 20, 40), seed 0;
* ``t1`` -- nilearn's ICBM152 2009 T1 as it is; ``t1-f20`` / ``t1-f40`` -- the same T1 times
  a 20 % / 40 % smooth random field (seed 1).

Methods: ``plain`` (``segment run -k 3 --mask MASK``), ``mrf`` (``--mrf``), ``preset``
(``--pipeline t1-brain-3class --mask MASK``), ``oracle`` (the true field divided out of the
image, then ``--pipeline t1-brain-3class --no-bias-field``), and the peers ``sklearn``,
``atropos``, ``n4-atropos`` (:mod:`peers`). Every method runs as a subprocess (the CLI as users
run it; the peers through ``benchmarks/peers.py``); seconds are its wall time (start-up and
imports included) and peak memory the largest summed RSS of its process tree (psutil, polled
every 20 ms).

Per case and method: strict Dice of CSF/GM/WM (label k against tissue k, k = 1..3 by ascending
mean, inside the mask), and the partial-volume metrics: per class, the mean absolute error of
the estimated fraction and the volume error (sum of fractions vs the true sum, %). The fractions
are ``segment``'s ``<stem>_pve`` output when ``segment run`` has ``--pve`` (used for ``preset``
and ``oracle``), otherwise the posteriors (``<stem>_probseg``; the peers' posteriors).

Usage::

    python benchmarks/realistic.py --quick                      # 4 cases, segment methods, 2 mm
    python benchmarks/realistic.py                              # everything at 1 mm
    python benchmarks/realistic.py --cases t1 pv-n3-f20 --methods plain preset --resolution 2

From Python: ``run_case("pv-n3-f20", "preset", resolution=2)`` returns a dict of the metrics.
Generated images are cached in ``benchmarks/.cache/realistic_v1_r{1,2}/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import phantoms  # noqa: E402

CACHE_VERSION = "realistic_v1"
NOISES = (0, 3, 5, 7, 9)
FIELDS = (0, 20, 40)
PV_CASES = tuple(f"pv-n{n}-f{f}" for n in NOISES for f in FIELDS)
T1_CASES = ("t1", "t1-f20", "t1-f40")
ALL_CASES = PV_CASES + T1_CASES
QUICK_CASES = ("t1", "t1-f40", "pv-n3-f20", "pv-n9-f40")
SEGMENT_METHODS = ("plain", "mrf", "preset", "oracle")
PEER_METHODS = ("sklearn", "atropos", "n4-atropos")
ALL_METHODS = SEGMENT_METHODS + PEER_METHODS
PVE_METHODS = ("preset", "oracle")
T1_FIELD_SEED = 1
PV_SEED = 0
TISSUES = phantoms.TISSUES

_SEGMENT_ARGS = {
    "plain": ["-k", "3"],
    "mrf": ["-k", "3", "--mrf"],
    "preset": ["--pipeline", "t1-brain-3class"],
    "oracle": ["--pipeline", "t1-brain-3class", "--no-bias-field"],
}


# ----------------------------------------------------------------------------- cases on disk


def cache_dir(resolution: int, root: Path | None = None) -> Path:
    return (root or HERE / ".cache") / f"{CACHE_VERSION}_r{resolution}"


def _parse_case(name: str) -> tuple[str, float, float]:
    """('pv', noise, field) or ('t1', 0, field) from a case name."""
    m = re.fullmatch(r"pv-n(\d+(?:\.\d+)?)-f(\d+(?:\.\d+)?)", name)
    if m:
        return "pv", float(m[1]), float(m[2])
    m = re.fullmatch(r"t1(?:-f(\d+(?:\.\d+)?))?", name)
    if m:
        return "t1", 0.0, float(m[1] or 0)
    raise ValueError(f"unknown case {name!r}: pv-nN-fF (e.g. pv-n3-f20), t1, t1-f20 or t1-f40")


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def prepare_case(name: str, resolution: int = 1, root: Path | None = None) -> dict[str, Path]:
    """Write (once) a case's image, oracle image, mask and truth; return their paths.

    Returns
    -------
    dict
        ``image``, ``oracle`` (image / true field), ``mask`` (uint8 NIfTI) and ``truth`` (``.npz``
        with ``fractions`` (3, N) float32 inside the mask, CSF/GM/WM).
    """
    kind, noise, field_pct = _parse_case(name)
    folder = cache_dir(resolution, root)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "image": folder / f"{name}.nii.gz",
        "oracle": folder / f"{name}_oracle.nii.gz",
        "mask": folder / f"{kind}_mask.nii.gz",
        "truth": folder / f"{kind}_truth.npz",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    if kind == "pv":
        anatomy_path = folder / "pv_anatomy.npz"
        if anatomy_path.exists():
            with np.load(anatomy_path) as z:
                fractions = z["fractions"].astype(np.float32) / 8.0
                mask, affine = z["mask"], z["affine"]
            means = np.asarray(phantoms.T1_MEANS, np.float32).reshape(3, 1, 1, 1)
            anatomy = phantoms.Volume(
                (fractions * means).sum(axis=0, dtype=np.float32),
                mask,
                fractions,
                np.where(mask, fractions.argmax(axis=0) + 1, 0).astype(np.uint8),
                np.ones(mask.shape, np.float32),
                affine,
            )
        else:
            anatomy = phantoms.partial_volume_anatomy(resolution)
            np.savez(
                anatomy_path,
                fractions=np.rint(anatomy.fractions * 8).astype(np.uint8),
                mask=anatomy.mask,
                affine=anatomy.affine,
            )
        vol = phantoms.partial_volume_phantom(
            noise, field_pct, PV_SEED, resolution, anatomy=anatomy
        )
    else:
        vol = phantoms.icbm152(resolution)
        field = phantoms.smooth_random_field(
            vol.image.shape, vol.spacing, field_pct / 100.0, T1_FIELD_SEED, vol.mask
        )
        vol.image = (vol.image * field).astype(np.float32)
        vol.field = field
    _save_nifti(paths["image"], vol.image, vol.affine)
    _save_nifti(paths["oracle"], (vol.image / vol.field).astype(np.float32), vol.affine)
    if not paths["mask"].exists():
        _save_nifti(paths["mask"], vol.mask.astype(np.uint8), vol.affine)
    if not paths["truth"].exists():
        np.savez(paths["truth"], fractions=vol.fractions[:, vol.mask].astype(np.float32))
    return paths


# ----------------------------------------------------------------------------- running


def segment_has_pve() -> bool:
    """Whether ``segment run`` of this checkout has a ``--pve`` option."""
    out = subprocess.run(
        [sys.executable, "-m", "segment", "run", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        check=True,
    ).stdout
    return "--pve" in out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_monitored(cmd: list[str], poll: float = 0.02) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak summed RSS of its process tree in MB).

    Raises
    ------
    RuntimeError
        If the command fails (its stderr tail is in the message).
    """
    import psutil

    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=_env())
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss
                for child in ps.children(recursive=True):
                    try:
                        rss += child.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(poll)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return seconds, peak / 2**20


def _segment_command(method: str, paths: dict[str, Path], out: Path, pve: bool) -> list[str]:
    image = paths["oracle"] if method == "oracle" else paths["image"]
    cmd = [sys.executable, "-m", "segment", "run", str(image), "-o", str(out)]
    cmd += _SEGMENT_ARGS[method] + ["--mask", str(paths["mask"])]
    cmd += ["--no-qc", "--overwrite", "-q"]
    return cmd + ["--pve"] * pve


def _read_outputs(out: Path, pve: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """(labels (X, Y, Z), fractions (X, Y, Z, K), source name) from an output folder."""
    dseg = next(out.glob("*dseg.nii.gz"))
    labels = np.asarray(nib.load(dseg).dataobj).astype(np.int16)
    frac_file = next(out.glob("*_pve.nii.gz"), None) if pve else None
    source = "pve"
    if frac_file is None:
        frac_file, source = next(out.glob("*probseg.nii.gz")), "probseg"
    fractions = np.asarray(nib.load(frac_file).dataobj, dtype=np.float32)
    if fractions.shape[-1] != 3 and fractions.shape[0] == 3:
        fractions = np.moveaxis(fractions, 0, -1)
    return labels, fractions, source


def dice_per_class(labels: np.ndarray, truth: np.ndarray, k: int = 3) -> list[float]:
    """Strict Dice of label j and truth j (j = 1..k) over the given (masked) voxels.

    Parameters
    ----------
    labels, truth : (N,) int

    Returns
    -------
    list of k floats
    """
    out = []
    for j in range(1, k + 1):
        a, b = labels == j, truth == j
        denom = a.sum() + b.sum()
        out.append(float(2 * (a & b).sum() / denom) if denom else float("nan"))
    return out


def fraction_metrics(estimated: np.ndarray, true: np.ndarray) -> tuple[list[float], list[float]]:
    """Per class: mean absolute fraction error and volume error (%).

    Parameters
    ----------
    estimated, true : (N, K) float
        Fractions inside the mask.

    Returns
    -------
    mae : list of K floats
    volume_error_pct : list of K floats
        ``100 * (sum estimated - sum true) / sum true``.
    """
    mae = np.abs(estimated - true).mean(axis=0)
    vol = 100.0 * (estimated.sum(axis=0) - true.sum(axis=0)) / true.sum(axis=0)
    return [float(v) for v in mae], [float(v) for v in vol]


def run_case(
    case_name: str,
    method: str,
    *,
    resolution: int = 1,
    pve: bool | None = None,
    keep: Path | None = None,
    cache_root: Path | None = None,
) -> dict:
    """Run one method on one case and score it.

    Parameters
    ----------
    case_name : str
        e.g. ``"pv-n3-f20"``, ``"t1"``, ``"t1-f40"``.
    method : str
        One of :data:`ALL_METHODS`.
    resolution : {1, 2}
        Grid in mm.
    pve : bool, optional
        Pass ``--pve`` (preset and oracle only); default: when ``segment run`` has it.
    keep : Path, optional
        Folder to keep the outputs in (default: a temporary folder, deleted).
    cache_root : Path, optional
        Where the generated cases live (default ``benchmarks/.cache``).

    Returns
    -------
    dict
        ``case``, ``method``, ``resolution``, ``dice`` (CSF, GM, WM), ``seconds``, ``peak_mb``,
        ``fraction_source`` ("pve" or "probseg"), ``fraction_mae`` and ``volume_error_pct``
        (CSF, GM, WM).
    """
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}: one of {', '.join(ALL_METHODS)}")
    paths = prepare_case(case_name, resolution, cache_root)
    use_pve = method in PVE_METHODS and (segment_has_pve() if pve is None else pve)
    tmp = None
    out = keep
    if out is None:
        tmp = tempfile.mkdtemp(prefix="realistic_")
        out = Path(tmp)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if method in SEGMENT_METHODS:
            cmd = _segment_command(method, paths, out, use_pve)
        else:
            peers = str(HERE / "peers.py")
            cmd = [sys.executable, peers, method, str(paths["image"]), str(paths["mask"]), str(out)]
        seconds, peak_mb = run_monitored(cmd)
        labels, fractions, source = _read_outputs(out, use_pve)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    mask = np.asarray(nib.load(paths["mask"]).dataobj) > 0
    with np.load(paths["truth"]) as z:
        true_fractions = z["fractions"].T  # (N, 3)
    truth = true_fractions.argmax(axis=1) + 1
    mae, vol = fraction_metrics(fractions[mask], true_fractions)
    return {
        "case": case_name,
        "method": method,
        "resolution": resolution,
        "dice": dice_per_class(labels[mask], truth),
        "seconds": seconds,
        "peak_mb": peak_mb,
        "fraction_source": source,
        "fraction_mae": mae,
        "volume_error_pct": vol,
    }


# ----------------------------------------------------------------------------- report


def _fmt(v: float, spec: str = ".3f") -> str:
    return "n/a" if v is None or not np.isfinite(v) else format(v, spec)


def dice_table(rows: list[dict]) -> str:
    lines = [
        "| case | method | CSF | GM | WM | seconds | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["dice"]
        lines.append(
            f"| {r['case']} | {r['method']} | {_fmt(d[0])} | {_fmt(d[1])} | {_fmt(d[2])} "
            f"| {_fmt(r['seconds'], '.1f')} | {_fmt(r['peak_mb'], '.0f')} |"
        )
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """One line per case, one column per method: GM/WM Dice."""
    by = {(r["case"], r["method"]): r for r in rows}
    cases = [c for c in ALL_CASES if any(r["case"] == c for r in rows)]
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in rows)]
    lines = ["| case | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for case in cases:
        cells = []
        for m in methods:
            r = by.get((case, m))
            cells.append("" if r is None else f"{r['dice'][1]:.2f}/{r['dice'][2]:.2f}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pv_table(rows: list[dict]) -> str:
    head = (
        " | ".join(f"MAE {t}" for t in TISSUES) + " | " + " | ".join(f"vol% {t}" for t in TISSUES)
    )
    lines = [f"| case | method | from | {head} |", "|---|---|---|" + "---|" * 6]
    for r in rows:
        m, v = r["fraction_mae"], r["volume_error_pct"]
        lines.append(
            f"| {r['case']} | {r['method']} | {r['fraction_source']} | "
            + " | ".join(_fmt(x) for x in m)
            + " | "
            + " | ".join(_fmt(x, "+.1f") for x in v)
            + " |"
        )
    return "\n".join(lines)


def target_check(rows: list[dict], tol: float = 0.03, uniform_tol: float = 0.01) -> str:
    """The issue's targets on GM and WM Dice, one line per failed or passed check."""
    by = {(r["case"], r["method"]): r for r in rows}
    cases = sorted({r["case"] for r in rows}, key=ALL_CASES.index)
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"- [{'x' if ok else ' '}] {text}")

    for case in cases:
        preset = by.get((case, "preset"))
        if preset is None:
            continue
        p = preset["dice"][1:]
        oracle = by.get((case, "oracle"))
        if oracle is not None:
            o = oracle["dice"][1:]
            ok = all(pi >= oi - tol for pi, oi in zip(p, o))
            check(
                ok,
                f"{case}: preset GM/WM {p[0]:.3f}/{p[1]:.3f} within {tol} of oracle "
                f"{o[0]:.3f}/{o[1]:.3f}",
            )
        plain = by.get((case, "plain"))
        if case == "t1" and plain is not None:
            q = plain["dice"][1:]
            ok = all(pi >= qi - uniform_tol for pi, qi in zip(p, q))
            check(
                ok,
                f"{case}: preset GM/WM {p[0]:.3f}/{p[1]:.3f} >= plain {q[0]:.3f}/{q[1]:.3f}"
                f" - {uniform_tol}",
            )
        for peer in PEER_METHODS:
            r = by.get((case, peer))
            if r is None:
                continue
            q = r["dice"][1:]
            ok = all(pi >= qi for pi, qi in zip(p, q))
            check(ok, f"{case}: preset GM/WM {p[0]:.3f}/{p[1]:.3f} >= {peer} {q[0]:.3f}/{q[1]:.3f}")
    passed = sum(line.startswith("- [x]") for line in lines)
    return f"{passed}/{len(lines)} checks pass\n\n" + "\n".join(lines)


def report(rows: list[dict], resolution: int, pve: bool) -> str:
    known = [r for r in rows if r["case"] in ALL_CASES and r["method"] in ALL_METHODS]
    rows = sorted(known, key=lambda r: (ALL_CASES.index(r["case"]), ALL_METHODS.index(r["method"])))
    pv_rows = [r for r in rows if r["case"].startswith("pv-")]
    parts = [
        f"### GM/WM Dice (strict, inside the brain mask) -- {resolution} mm",
        "",
        summary_table(rows),
        "",
        f"### Dice (strict, inside the brain mask), seconds, peak memory -- {resolution} mm",
        "",
        dice_table(rows),
        "",
        f"### Partial volume (fractions from {'--pve' if pve else 'the posteriors'} for preset"
        " and oracle; the posteriors otherwise)",
        "",
        pv_table(pv_rows) if pv_rows else "(no partial-volume case run)",
        "",
        "### Targets (GM and WM Dice)",
        "",
        target_check(rows),
    ]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 cases, segment methods, 2 mm")
    parser.add_argument("--methods", nargs="+", choices=ALL_METHODS)
    parser.add_argument("--cases", nargs="+")
    parser.add_argument("--resolution", type=int, choices=(1, 2))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "realistic.md")
    parser.add_argument("--rows-out", type=Path, help="append each row as JSON (a .jsonl file)")
    parser.add_argument(
        "--report-from", type=Path, nargs="+", help="only print the report of saved .jsonl rows"
    )
    args = parser.parse_args(argv)
    if args.report_from:
        rows = [json.loads(line) for p in args.report_from for line in p.read_text().splitlines()]
        text = report(rows, rows[0]["resolution"], any(r["fraction_source"] == "pve" for r in rows))
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        return 0
    cases = args.cases or (QUICK_CASES if args.quick else ALL_CASES)
    methods = args.methods or (SEGMENT_METHODS if args.quick else ALL_METHODS)
    resolution = args.resolution or (2 if args.quick else 1)
    for case in cases:
        _parse_case(case)
    pve = segment_has_pve()
    print(f"segment --pve available: {pve}", flush=True)
    rows = []
    start = time.perf_counter()
    for case in cases:
        t = time.perf_counter()
        prepare_case(case, resolution)
        print(f"[{case}] prepared in {time.perf_counter() - t:.1f} s", flush=True)
        for method in methods:
            row = run_case(case, method, resolution=resolution, pve=pve)
            rows.append(row)
            d = row["dice"]
            print(
                f"  {method:<11} CSF/GM/WM {d[0]:.3f}/{d[1]:.3f}/{d[2]:.3f}"
                f"  {row['seconds']:.1f} s  {row['peak_mb']:.0f} MB",
                flush=True,
            )
            if args.rows_out:
                with open(args.rows_out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    text = report(rows, resolution, pve)
    text += f"\nTotal {time.perf_counter() - start:.0f} s.\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
