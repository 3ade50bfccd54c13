"""Shared by every benchmark: interleaved repetitions, median ratios with their range,
and plain-text tables. Benchmarks report ratios measured in one run (docs/design.md, Targets)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(slots=True, frozen=True)
class Ratio:
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.3g}x [{self.low:.3g}-{self.high:.3g}]"


def ratio(numerators: Sequence[float], denominators: Sequence[float]) -> Ratio:
    """Median and range of per-repetition ratios (repetition i against repetition i)."""
    values = [n / d for n, d in zip(numerators, denominators, strict=True) if d]
    return Ratio(statistics.median(values), min(values), max(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def us(ns: float) -> str:
    return f"{ns / 1000:.2f}"
