"""Fuzz `segment run` with hostile NIfTI headers and gzip streams (seeded; see tests/hostile.py).

    PYTHONPATH=. python benchmarks/fuzz_cli.py --n 500 --seed 1

Every case runs `segment run FILE -o OUT -k 3` in this process (click's CliRunner, stderr
apart) under a 120 s alarm, and is classified: ok (exit 0 and sane maps: labels 0..3,
probabilities finite in [0, 1] summing to 1 inside the mask), refused (exit 1 and one line
`Error: FILE: ...` on stderr), or a failure: a traceback, a hang, an "unexpected" error, a
multi-line error, another exit code, a corrupt gzip stream accepted or insane maps.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import hostile  # noqa: E402

from segment.cli import cli  # noqa: E402


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang


def sane_maps(out: Path, stem: str) -> str:
    """'' when the outputs of a successful run are sane, else what is wrong."""
    dseg = np.asanyarray(nib.load(out / f"{stem}_dseg.nii.gz").dataobj)
    prob = np.asanyarray(nib.load(out / f"{stem}_probseg.nii.gz").dataobj)
    if dseg.min() < 0 or dseg.max() > 3:
        return f"labels {dseg.min()}..{dseg.max()}"
    if not np.all(np.isfinite(prob)) or prob.min() < 0 or prob.max() > 1 + 1e-5:
        return "probabilities not finite in [0, 1]"
    inside = dseg > 0
    sums = prob.reshape(-1, prob.shape[-1])[inside.reshape(-1)].sum(axis=1)
    if sums.size and not np.allclose(sums, 1, atol=1e-4):
        return "probabilities do not sum to 1"
    if not (out / f"{stem}_segment.json").exists():
        return "no sidecar"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    runner = CliRunner()
    counts, failures = collections.Counter(), []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, kind, what, data in hostile.mutations(args.seed, args.n):
            path = tmp / name
            path.write_bytes(data)
            out = tmp / f"out_{name}"
            signal.alarm(120)
            try:
                result = runner.invoke(
                    cli, ["run", str(path), "-o", str(out), "-k", "3", "--max-iter", "50"]
                )
                signal.alarm(0)
            except Hang:
                failures.append((name, what, "hang"))
                continue
            err = result.stderr
            stem = name.split(".")[0]
            problem = ""
            if result.exception and not isinstance(result.exception, SystemExit):
                problem = f"traceback {type(result.exception).__name__}: {result.exception}"
            elif "unexpected" in err:
                problem = "unexpected: " + err.strip()
            elif result.exit_code == 0:
                if kind == "gzip" and hostile.corrupt_gzip(data):
                    problem = "corrupt gzip accepted"
                else:
                    problem = sane_maps(out, stem)
                counts[kind, "ok"] += 1
            elif result.exit_code == 1:
                lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
                if len(lines) != 1 or not lines[0].startswith(f"Error: {path}: "):
                    problem = "not one line naming the file: " + repr(err)
                counts[kind, "refused"] += 1
            else:
                problem = f"exit {result.exit_code}: {err!r}"
            if problem:
                failures.append((name, what, problem))
    seconds = time.perf_counter() - start
    print(json.dumps({"cases": args.n, "seed": args.seed, "seconds": round(seconds, 1),
                      "counts": {f"{k}/{v}": n for (k, v), n in sorted(counts.items())},
                      "failures": len(failures)}, indent=1))  # fmt: skip
    for failure in failures[:50]:
        print(*failure, sep="\t")


if __name__ == "__main__":
    main()
