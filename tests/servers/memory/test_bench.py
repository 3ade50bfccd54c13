"""`llmos bench memory` runs end to end on tiny sizes and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.bench import memory as bench


def test_bench_memory_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "memory.json"
    argv = [
        "--blocks",
        "64",
        "--batches",
        "1,8",
        "--seconds",
        "0.01",
        "--repeats",
        "2",
        "--segment-kib",
        "256",
        "--segment-ops",
        "300",
        "--json",
        str(out),
    ]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "alloc+free/s" in printed and "F mean" in printed
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["allocation"]] == [1, 8]
    assert all(r["pairs_per_s"] > 0 and len(r["runs"]) == 2 for r in data["allocation"])
    assert 0 <= data["fragmentation"]["f_mean"] <= data["fragmentation"]["f_max"] <= 1
    assert set(data) == {"benchmark", "args", "allocation", "fragmentation"}


def test_bench_memory_rejects_bad_options() -> None:
    for argv in (
        ["--batches", "0"],
        ["--blocks", "8", "--batches", "5"],
        ["--occupancy", "2"],
        ["--batches", "x"],
    ):
        with pytest.raises(SystemExit):
            bench.main(argv)
