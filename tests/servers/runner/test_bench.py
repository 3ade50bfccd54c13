"""`llmos bench model` runs end to end on a tiny configuration and writes its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.bench import model as bench


def test_bench_model_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model.json"
    argv = ["--batches", "1,3", "--max-pos", "12", "--prompt", "4", "--prefill", "32", "--repeats", "2",
            "--threads", "2", "--json", str(out)]
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    assert "ours tok/s" in table and "ours/numpy" in table and "peak RSS" in table
    data = json.loads(out.read_text())
    assert [r["metric"] for r in data["results"]] == ["prefill 32", "decode B=1", "decode B=3"]
    for row in data["results"]:
        assert len(row["ours"]["runs"]) == 2 and row["ours"]["median"] > 0
    for row in data["results"][1:]:
        assert len(row["numpy"]["runs"]) == 2 and row["ours_over_numpy"]["median"] > 0
    # Both implementations pick the same greedy tokens after the same prompts.
    assert data["same_greedy_text_as_numpy"] == {"1": True, "3": True}
    assert data["weight_bytes"] > 0 and data["peak_rss_bytes"] > 0


def test_bench_model_rejects_bad_options() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--batches", "0"])
    assert bench.main(["--max-pos", "100000", "--repeats", "1"]) == 2
    with pytest.raises(SystemExit):
        bench.main(["--llama-cpp", "/nonexistent"])
