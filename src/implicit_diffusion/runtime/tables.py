"""The terminal tables experiments print after a run (``experiment.table(result)``)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["columns", "key_values"]


def key_values(rows: Sequence[tuple[str, str]]) -> str:
    """Two columns, the names padded to the longest, indented by two spaces.

    >>> print(key_values([("reward", "0.29"), ("wall time", "1.2 s")]))
      reward     0.29
      wall time  1.2 s
    """
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"  {a:<{width}}  {b}" for a, b in rows)


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells, each column padded to its widest cell, indented by two spaces (one line per row).

    >>> for line in columns([("method", "θ"), ("nested", "0.25")]):
    ...     print(line.rstrip())
      method  θ
      nested  0.25
    """
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
