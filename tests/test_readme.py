"""The README's examples run as written, in order, on the files they name.

Python examples run one by one; shell (```bash) examples run in order, each block as one bash
script, in a temporary copy of the shipped files, with ``segment`` (and ``.venv/bin/segment``,
``.venv/bin/python``) running the interpreter of this test.  Where the README states a result
(the evaluate table, the error of a second run, the BIDS derivative's files), it is checked.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, content) of each fenced block, in order (language "" for plain output)."""
    return re.findall(r"^```(\w*)\n(.*?)^```$", text, flags=re.S | re.M)


BLOCKS = _fenced_blocks(README)
EXAMPLES = [text for language, text in BLOCKS if language == "python"]
SHELL = [text for language, text in BLOCKS if language == "bash"]

#: Shell commands of the README that are not run (each a line, or one part of an ``a && b``
#: line, starting with the key), and why.  The test asserts that exactly these are left out.
NOT_RUN = {
    "python3 -m venv .venv": "creates a virtual environment: the test runs in one already",
    '.venv/bin/pip install -e ".[test]"': "installs the checkout the test is part of",
    ".venv/bin/python -m pytest": "runs the test suite, which this test is part of",
    "pip install segment-em": "installs from PyPI",
    "segment run INPUT [INPUT ...] -o OUTDIR": "a synopsis (placeholders in capitals)",
    "dask scheduler": "starts a service: the test starts a dask LocalCluster instead",
    "dask worker tcp://HOST:8786": "starts a service: the LocalCluster has the workers",
}
#: Placeholder replaced when run: the address of the test's LocalCluster.
SCHEDULER = "tcp://HOST:8786"


def _lines(block: str) -> list[list[tuple[str, bool]]]:
    """Per line of a shell block, (command, runs) of each part of ``a && b``."""
    return [
        [(part.strip(), not part.strip().startswith(tuple(NOT_RUN))) for part in line.split(" && ")]
        for line in block.strip().splitlines()
    ]


def _commands(block: str) -> list[tuple[str, bool]]:
    return [command for line in _lines(block) for command in line]


def _script(block: str, scheduler: str | None) -> str:
    """The block as a bash script: one line per README line, without the commands not run."""
    lines = [" && ".join(cmd for cmd, runs in line if runs) for line in _lines(block)]
    script = "\n".join(line for line in lines if line)
    return script.replace(SCHEDULER, scheduler) if scheduler else script


def _check_outputs_written(block: str, cwd: Path) -> int:
    """Each ``segment run|batch -o DIR`` of the block wrote its sidecar or summary in DIR."""
    checked = 0
    for command, runs in _commands(block):
        if command.startswith("cd "):
            cwd = (cwd / command.split()[1]).resolve()
        match = re.search(r"segment (run|batch) .* -o (\S+)", command)
        if runs and match:
            written = cwd / match.group(2)
            pattern = "*_segment.json" if match.group(1) == "run" else "batch_summary.tsv"
            assert any(written.glob(pattern)), f"{command}: no {pattern} in {written}"
            checked += 1
    return checked


def test_the_readme_has_python_and_shell_examples():
    assert len(EXAMPLES) >= 3
    assert len(SHELL) >= 6


def test_exactly_the_listed_shell_commands_are_not_run():
    skipped = [cmd for block in SHELL for cmd, runs in _commands(block) if not runs]
    assert [next(k for k in NOT_RUN if cmd.startswith(k)) for cmd in skipped] == list(NOT_RUN)
    ran = [cmd for block in SHELL for cmd, runs in _commands(block) if runs]
    assert sum(cmd.startswith(("segment ", ".venv/bin/segment ")) for cmd in ran) >= 12


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_python_example_runs(tmp_path, index):
    (tmp_path / "sample_scans").symlink_to(ROOT / "sample_scans")
    result = subprocess.run(
        [sys.executable, "-c", EXAMPLES[index]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip(), "the example prints what it shows"


def _words(text: str) -> str:
    return " ".join(text.split())


def _claimed_block(first_line_start: str) -> list[str]:
    """Lines of the README's plain ``` block whose first line starts with the given text."""
    for language, block in BLOCKS:
        if language == "" and block.lstrip().startswith(first_line_start):
            return block.rstrip().splitlines()
    raise AssertionError(f"no README output block starting with {first_line_start!r}")


def _environment(tmp_path: Path) -> dict:
    """Copies of the shipped files and ``segment`` on PATH from this interpreter."""
    import os

    import segment

    shutil.copytree(ROOT / "sample_scans", tmp_path / "sample_scans")
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    for folder in (tmp_path / "bin", tmp_path / ".venv" / "bin"):
        folder.mkdir(parents=True)
        for name, command in (("segment", "-m segment"), ("python", "")):
            shim = folder / name
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" {command} "$@"\n')
            shim.chmod(0o755)
    package_root = str(Path(segment.__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    path = os.pathsep.join([str(tmp_path / "bin"), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath}


def _run(script: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip


def _check_evaluate_table(stdout: str) -> None:
    """Every line the README shows of the evaluate table is in the output (``...`` elided)."""
    claimed = [_words(line) for line in _claimed_block("class  matched") if line.strip() != "..."]
    printed = {_words(line) for line in stdout.splitlines()}
    missing = [line for line in claimed if line and line not in printed]
    assert not missing, f"README claims {missing}; segment evaluate printed:\n{stdout}"


def _check_bids_tree(root: Path) -> None:
    """Every file the README's derivative tree shows exists (with its ``.json`` if claimed)."""
    lines = _claimed_block("derivatives/segment/")
    assert _words(lines[0]) == "derivatives/segment/"
    for line in lines[1:]:
        text = line.split("#")[0]
        for name in text.replace("(+ .json)", "").split():
            assert (root / name).is_file(), name
            if "(+ .json)" in text:
                assert (root / name.replace(".nii.gz", ".json")).is_file(), name


def _walk(tmp_path: Path, blocks: list[str], scheduler: str | None) -> int:
    """Run shell blocks in order in ``tmp_path``, checking what the README claims of them;
    returns the number of ``segment run|batch`` outputs checked."""
    env = _environment(tmp_path)
    checked = 0
    for block in blocks:
        result = _run(_script(block, scheduler), tmp_path, env)
        assert result.returncode == 0, f"{block}\n{result.stderr[-3000:]}"
        checked += _check_outputs_written(block, tmp_path)
        if "segment evaluate" in block:
            _check_evaluate_table(result.stdout)
        if block is SHELL[0]:  # the set-up command: its outputs, and what a second run says
            for suffix in ("_dseg.nii.gz", "_probseg.nii.gz", "_qc.png", "_segment.json"):
                assert (tmp_path / "out" / f"head_t1{suffix}").is_file()
            rerun = _run(_script(block.splitlines()[0], None), tmp_path, env)
            claim = re.search(r"stops with `(Error: [^`]*)`", README, flags=re.S).group(1)
            assert rerun.returncode == 1 and _words(claim) in _words(rerun.stderr)
    return checked


def test_readme_first_minute_runs_with_the_results_it_claims(tmp_path):
    """The set-up command and the evaluate table (the first two shell blocks), in the default
    suite; the slow test below runs every block."""
    assert "segment evaluate" in SHELL[1]
    assert _walk(tmp_path, SHELL[:2], None) == 1


@pytest.mark.slow  # about 80 s on an idle 2-core machine: 16 segmentations
def test_readme_shell_examples_run_in_order_with_the_results_they_claim(tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp",
                      dashboard_address=None) as cluster:  # fmt: skip
        checked = _walk(tmp_path, SHELL, cluster.scheduler_address)
    assert checked >= 10
    _check_bids_tree(tmp_path / "raw" / "derivatives" / "segment")
    for summary in tmp_path.glob("out*/batch_summary.tsv"):  # exit 0: no scan failed
        assert "\tfailed\t" not in summary.read_text()
