"""`llmos bench model` runs end to end on a tiny configuration and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bench import model as bench


def test_bench_model_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.json"
    assert (
        bench.main(["--batches", "1,3", "--max-pos", "12", "--repeats", "2", "--json", str(out)])
        == 0
    )
    table = capsys.readouterr().out
    assert "ours tok/s" in table and "ratio" in table
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [1, 3]
    for row in data["results"]:
        assert len(row["ours_runs"]) == len(row["numpy_runs"]) == 2
        assert row["ours_tok_s"]["median"] > 0 and row["ratio"]["median"] > 0
        assert row["same_greedy_text"]  # both implementations pick the same tokens


def test_bench_model_rejects_bad_options() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--batches", "0"])
    assert bench.main(["--max-pos", "100000", "--repeats", "1"]) == 2
