"""Accuracy benchmark: Dice per class on BrainWeb-style head phantoms, plain vs MRF vs bias field.

For every case of the grid ``noise`` (3, 9 %) x ``non-uniformity`` (0, 20, 40 %) it generates
:func:`segment.samples.make_head_phantom` (same anatomy seed, so every case shares its ground
truth) and runs :func:`segment.segment_array` with the phantom's voxel spacing in two set-ups:

* **K = 3, brain mask** -- fitted inside the ground-truth brain (CSF + GM + WM); Dice is
  computed only inside the mask (prediction and reference set to 0 outside, ``ignore_zero``).
* **K = 6, whole head** -- every voxel, compared with all six tissues.

each with four methods: ``plain`` (the mixture alone), ``mrf`` (``mrf_beta`` = the CLI default
:data:`segment.cli.DEFAULT_MRF_BETA`), ``bias`` (``bias_field=True`` at the default smoothness)
and ``both``. Labels are matched to tissues by :func:`segment.evaluate.evaluate_labels`
(Hungarian matching). It prints Markdown tables (rows: case x method; columns: Dice per class,
mean, seconds, EM iterations) and a check of the targets of issues 5 and 7, and writes them to
``--out``.

``--sweep-beta`` instead tries several MRF strengths with and without the bias field on the
K = 3 masked grid (``--sweep-k 3 6`` adds the whole head) and reports, per beta, the mean GM/WM
Dice over the grid, GM/WM at 9 % noise / 40 % non-uniformity, and the worst drop of any class
against the plain mixture, so that the default strength is chosen on evidence.

Usage::

    python benchmarks/accuracy.py                          # full grid, default shape
    python benchmarks/accuracy.py --shape 64 76 60 --out results.md
    python benchmarks/accuracy.py --sweep-beta --out sweep.md

Not part of the test run; a full grid takes a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from segment.api import DEFAULT_OPTIONS, segment_array
from segment.cli import DEFAULT_MRF_BETA
from segment.evaluate import evaluate_labels
from segment.exceptions import ConvergenceWarning
from segment.samples import DEFAULT_SHAPE, make_head_phantom

NOISES = (3.0, 9.0)
NONUNIFORMITIES = (0.0, 20.0, 40.0)
BRAIN = (3, 4, 5)  # CSF, GM, WM in the phantom's ground truth
TISSUE_NAMES = {1: "air", 2: "skull", 3: "CSF", 4: "GM", 5: "WM", 6: "fat"}
SWEEP_BETAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8)


def methods(beta: float) -> dict[str, dict]:
    """The four option sets compared: plain, MRF, bias field, both."""
    return {
        "plain": {},
        "mrf": {"mrf_beta": beta},
        "bias": {"bias_field": True},
        "both": {"mrf_beta": beta, "bias_field": True},
    }


def voxel_spacing(affine: np.ndarray) -> tuple[float, ...]:
    """Voxel size in mm per axis from a 4x4 affine."""
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def run_one(image, truth, spacing, n_components: int, options: dict) -> dict:
    """Segment one phantom and score it: Dice per tissue, mean, seconds, iterations."""
    mask = np.isin(truth, BRAIN) if n_components == 3 else None
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = segment_array(image, mask, spacing=spacing, n_components=n_components, **options)
    seconds = time.perf_counter() - start
    if mask is not None:
        predicted = np.where(mask, result.labels, 0)
        reference = np.where(mask, truth, 0)
        scores = evaluate_labels(predicted, reference, ignore_zero=True)
    else:
        scores = evaluate_labels(result.labels, truth)
    dice = {TISSUE_NAMES[c["reference_label"]]: c["dice"] for c in scores["classes"]}
    return {
        "dice": dice,
        "mean": float(np.mean(list(dice.values()))),
        "seconds": seconds,
        "n_iter": result.estimator.n_iter_,
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
    }


def phantoms(shape, seed: int):
    """Yield ``(noise, nonuniformity, image, truth, spacing)`` over the grid."""
    for noise in NOISES:
        for inu in NONUNIFORMITIES:
            image, truth, affine = make_head_phantom(
                shape, noise=noise, nonuniformity=inu, seed=seed
            )
            yield noise, inu, image, truth, voxel_spacing(affine)


def markdown_table(title: str, rows: list[dict]) -> str:
    """Rows of ``{"case", "method", **run_one()}`` as a Markdown table."""
    classes = list(rows[0]["dice"])
    head = ["case", "method", *classes, "mean", "seconds", "iterations"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            row["case"],
            row["method"],
            *(f"{row['dice'][c]:.3f}" for c in classes),
            f"{row['mean']:.3f}",
            f"{row['seconds']:.1f}",
            f"{row['n_iter']}" + ("" if row["converged"] else " (not converged)"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_targets(results: dict[int, list[dict]]) -> str:
    """The targets of issues 5 and 7 as a Markdown list of met / missed."""
    lines = ["### Targets", ""]

    def find(k, case, method):
        return next(r for r in results.get(k, []) if r["case"] == case and r["method"] == method)

    def mark(ok):
        return "met" if ok else "**MISSED**"

    if 3 in results:
        both = find(3, "9% / 40%", "both")
        ok = both["dice"]["GM"] >= 0.88 and both["dice"]["WM"] >= 0.88
        lines.append(
            f"- K=3 masked, 9 % / 40 %, MRF + bias: GM {both['dice']['GM']:.3f}, "
            f"WM {both['dice']['WM']:.3f} (target >= 0.88): {mark(ok)}"
        )
    if 6 in results:
        plain = find(6, "3% / 0%", "plain")
        worst = min(plain["dice"].values())
        lines.append(
            f"- K=6 whole head, 3 % / 0 %, default options (plain): lowest class Dice "
            f"{worst:.3f} (target >= 0.90 for every class): {mark(worst >= 0.90)}"
        )
    for k, rows in results.items():
        for method in ("mrf", "bias", "both"):
            drops = []
            for row in rows:
                if row["method"] != method:
                    continue
                plain = find(k, row["case"], "plain")
                drops += [(plain["dice"][c] - row["dice"][c], row["case"], c) for c in row["dice"]]
            drop, case, cls = max(drops)
            lines.append(
                f"- K={k}, {method} vs plain: worst drop {drop:+.3f} ({cls}, {case}) "
                f"(target <= 0.01): {mark(drop <= 0.01)}"
            )
        clean = [r for r in rows if r["case"] == "3% / 0%"]
        plain = find(k, "3% / 0%", "plain")
        for row in clean:
            if row["method"] != "plain":
                ok = row["mean"] >= plain["mean"] - 1e-3
                lines.append(
                    f"- K={k}, clean data (3 % / 0 %), {row['method']}: mean Dice "
                    f"{row['mean']:.3f} vs plain {plain['mean']:.3f}: {mark(ok)}"
                )
        both_time = [r["seconds"] for r in rows if r["method"] == "both"]
        plain_time = [r["seconds"] for r in rows if r["method"] == "plain"]
        ratio = float(np.mean(both_time) / np.mean(plain_time))
        # The issue's <= 3x is end to end (`segment run`, bench_suite.py's run+spatial case);
        # here only segment_array's fit is timed, where the plain integer fit is a few
        # hundredths of a second: reported for information, not checked.
        lines.append(
            f"- K={k}, segment_array time with both on / plain: {np.mean(both_time):.1f} s / "
            f"{np.mean(plain_time):.2f} s = {ratio:.1f}x (information: the <= 3x target is "
            "end to end, see bench_suite.py run+spatial)"
        )
    return "\n".join(lines) + "\n"


def accuracy_grid(shape, seed: int, ks: list[int], beta: float) -> str:
    """Run the full grid and return the Markdown report."""
    results: dict[int, list[dict]] = {k: [] for k in ks}
    for noise, inu, image, truth, spacing in phantoms(shape, seed):
        case = f"{noise:g}% / {inu:g}%"
        for k in ks:
            for name, options in methods(beta).items():
                row = {"case": case, "method": name, **run_one(image, truth, spacing, k, options)}
                results[k].append(row)
                print(
                    f"K={k} {case:>9} {name:>5}: mean Dice {row['mean']:.3f} "
                    f"in {row['seconds']:.1f} s",
                    file=sys.stderr,
                )
    titles = {3: "K = 3 inside the brain mask (Dice inside the mask)", 6: "K = 6 whole head"}
    parts = [
        f"## Accuracy on make_head_phantom{tuple(shape)}, seed {seed}",
        "",
        f"Case = noise / non-uniformity. mrf: mrf_beta={beta}; bias: bias_field=True, "
        f"bias_smoothness={DEFAULT_OPTIONS['bias_smoothness']} mm; both: the two together.",
        "",
    ]
    parts += [markdown_table(titles[k], rows) for k, rows in results.items()]
    parts.append(check_targets(results))
    return "\n".join(parts)


def beta_sweep(shape, seed: int, ks: list[int], betas: list[float]) -> str:
    """Mean GM/WM Dice and worst drop vs plain for each beta, with and without bias field."""
    cases = list(phantoms(shape, seed))
    lines = [
        f"## MRF strength sweep on make_head_phantom{tuple(shape)}, seed {seed}",
        "",
        "mean GM/WM: over the 6 cases of the grid; at 9/40: GM and WM Dice at 9 % noise / 40 % "
        "non-uniformity; worst drop: largest loss of any class Dice against the plain mixture "
        "over all cases (negative = gain everywhere); CSF min: lowest CSF Dice over the grid.",
        "",
    ]
    for k in ks:
        plain = {(n, i): run_one(img, t, sp, k, {}) for n, i, img, t, sp in cases}
        lines += [
            f"### K = {k}" + (" (brain mask)" if k == 3 else " (whole head)"),
            "",
            "| beta | bias | mean GM/WM | GM at 9/40 | WM at 9/40 | CSF min | worst drop "
            "| seconds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for bias in (False, True):
            for beta in ([0.0] if bias else []) + list(betas):
                runs = {
                    (n, i): run_one(img, t, sp, k, {"mrf_beta": beta, "bias_field": bias})
                    for n, i, img, t, sp in cases
                }
                gm_wm = np.mean([[r["dice"]["GM"], r["dice"]["WM"]] for r in runs.values()])
                hard = runs[(9.0, 40.0)]["dice"]
                drop = max(
                    plain[c]["dice"][cls] - r["dice"][cls]
                    for c, r in runs.items()
                    for cls in r["dice"]
                )
                csf = min(r["dice"]["CSF"] for r in runs.values())
                seconds = np.mean([r["seconds"] for r in runs.values()])
                lines.append(
                    f"| {beta:g} | {'on' if bias else 'off'} | {gm_wm:.3f} | "
                    f"{hard['GM']:.3f} | {hard['WM']:.3f} | {csf:.3f} | {drop:+.3f} | "
                    f"{seconds:.1f} |"
                )
                print(lines[-1], file=sys.stderr)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=list(DEFAULT_SHAPE),
        metavar=("X", "Y", "Z"),
        help="phantom shape (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="anatomy seed (default 0)")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[3, 6],
        choices=[3, 6],
        help="set-ups of the accuracy grid (default: 3 6)",
    )
    parser.add_argument(
        "--beta",
        type=float,
        default=DEFAULT_MRF_BETA,
        help="MRF strength of the mrf/both methods (default: the CLI default)",
    )
    parser.add_argument(
        "--sweep-beta",
        action="store_true",
        help="sweep the MRF strength instead of running the accuracy grid",
    )
    parser.add_argument("--betas", type=float, nargs="+", default=list(SWEEP_BETAS))
    parser.add_argument("--sweep-k", type=int, nargs="+", default=[3], choices=[3, 6])
    args = parser.parse_args(argv)
    if args.sweep_beta:
        report = beta_sweep(args.shape, args.seed, args.sweep_k, args.betas)
    else:
        report = accuracy_grid(args.shape, args.seed, args.k, args.beta)
    print(report)
    if args.out is not None:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
