"""``batch_summary.tsv``: one row per scan, rewritten atomically after every finished scan."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .io import atomic_write

__all__ = ["SUMMARY_COLUMNS", "SUMMARY_NAME", "row", "write_summary", "read_summary",
           "escape_tsv", "unescape_tsv"]  # fmt: skip

#: Columns of ``batch_summary.tsv``.
SUMMARY_COLUMNS = ("input", "status", "error", "K", "iterations", "converged", "log_likelihood",
                   "seconds", "dseg", "warnings")  # fmt: skip
SUMMARY_NAME = "batch_summary.tsv"


def row(rel: str, status: str, **values: Any) -> dict[str, Any]:
    row = dict.fromkeys(SUMMARY_COLUMNS, "")
    row.update(input=rel, status=status)
    row.update({k: v for k, v in values.items() if v is not None})
    row["error"] = " ".join(str(row["error"]).split())
    row["warnings"] = " ".join(str(row["warnings"]).split())
    return row


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6f}" if abs(value) < 1e6 else f"{value:.10g}"
    return escape_tsv(str(value))


#: Characters escaped in a summary field (the text format of PostgreSQL's COPY).
_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_TSV_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def escape_tsv(text: str) -> str:
    """``text`` with backslash, tab, newline and carriage return written ``\\``, ``\t``...

    So a file name holding a tab or a newline stays in its own field of its own row.

    Examples
    --------
    >>> escape_tsv("a\tb\nc")
    'a\\tb\\nc'
    """
    return "".join(_TSV_ESCAPES.get(char, char) for char in text)


def unescape_tsv(text: str) -> str:
    """Inverse of :func:`escape_tsv`."""
    return re.sub(r"\\(.)", lambda m: _TSV_UNESCAPES.get(m[1], "\\" + m[1]), text)


def write_summary(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``batch_summary.tsv`` atomically (tab-separated, one row per scan)."""
    rows = list(rows)
    columns = list(SUMMARY_COLUMNS) + ["volume_estimate"]
    n_volumes = max((int(k.rsplit("_", 1)[1]) for row in rows for k in row
                     if k.startswith("volume_ml_")), default=0)  # fmt: skip
    columns += [f"volume_ml_{k}" for k in range(1, n_volumes + 1)]
    lines = ["\t".join(columns)]
    lines += ["\t".join(_format(row.get(c, "")) for c in columns) for row in rows]
    with atomic_write(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def read_summary(path: str | Path) -> list[dict[str, str]]:
    """Rows of a ``batch_summary.tsv`` as dictionaries of strings."""
    header, *lines = Path(path).read_text().split("\n")
    names = header.split("\t")
    return [dict(zip(names, map(unescape_tsv, line.split("\t")))) for line in lines if line]
