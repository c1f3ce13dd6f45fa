"""Helpers shared by the benchmark scripts: statistics, PSS, and a ratio table printer."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path


def pss_kib(pid: int) -> int:
    """Proportional set size of one process (shared pages split between their users)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def p(xs: Sequence[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cols = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(str(r[i])) for r in cols) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cols[1:]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    return "\n".join(lines)
