"""`llmos bench serve`: the workload generator (pure), then small real runs end to end
(instances, worker processes, baselines, JSON and charts). Never asserts time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmos import cli
from llmos.bench import serve
from llmos.bench.serve_workload import (
    SENTENCES,
    Dist,
    Spec,
    WorkloadError,
    make_workload,
    parse_dist,
    parse_priorities,
)
from llmos.libllm.tokenizer import load_tokenizer
from llmos.servers.runner.loaders import default_tokenizer_path
from tests.conftest import unique_instance

SYMBOLS = ("T_s", "Q", "U", "F", "H", "L_s", "L_r", "B")
PNG = b"\x89PNG\r\n\x1a\n"
ENCODE = load_tokenizer(default_tokenizer_path()).encode


def records(section: dict[str, Any]) -> list[dict[str, Any]]:
    table = section["records"]
    return [dict(zip(table["fields"], row, strict=True)) for row in table["rows"]]


# -- the workload ----------------------------------------------------------------------------


def test_distributions_and_classes_parse() -> None:
    assert parse_dist("fixed:64") == Dist("fixed", 64)
    assert parse_dist("uniform:16:128") == Dist("uniform", 16, 128)
    assert parse_dist("lognormal:100:0.5") == Dist("lognormal", 100, 0.5)
    assert parse_priorities("0:3,2:1") == {0: 0.75, 2: 0.25}
    for bad in ("fixed", "uniform:9:3", "lognormal:0:1", "normal:1:2", "fixed:x"):
        with pytest.raises(WorkloadError):
            parse_dist(bad)
    for bad in ("a:1", "0:-1", "0:0"):
        with pytest.raises(WorkloadError):
            parse_priorities(bad)


def test_same_seed_same_workload_and_bounds() -> None:
    spec = Spec(400, seed=7, prompt_len=Dist("uniform", 16, 96), output_len=Dist("uniform", 8, 300),
                priorities={0: 0.8, 2: 0.2}, shared_prefix=0.5, num_prefixes=3, prefix_len=48, context=256)
    items = make_workload(spec, ENCODE)
    assert items == make_workload(spec, ENCODE)
    assert [i.prompt for i in items] != [i.prompt for i in make_workload(Spec(400, seed=8), ENCODE)]
    longest_word = max(len(ENCODE(w, bos=False)) for s in SENTENCES for w in s.split())
    for item in items:
        assert tuple(ENCODE(item.prompt)) == item.prompt_ids  # what libllm will send
        assert item.prompt_tokens + item.max_tokens <= spec.context
        assert 1 <= item.max_tokens <= 300
        assert item.priority in (0, 2) and item.arrival_s == 0.0 and item.temperature == 0.8
        if item.prefix < 0:
            assert 16 - longest_word <= item.prompt_tokens <= 96
        else:
            assert item.prompt_tokens <= max(96, spec.prefix_len + 8)
    assert any(i.prompt_tokens + i.max_tokens == spec.context for i in items)  # clipped to fit
    shared = [i for i in items if i.prefix >= 0]
    assert 0.4 < len(shared) / len(items) < 0.6
    assert 0.7 < sum(i.priority == 0 for i in items) / len(items) < 0.9
    for prefix in range(spec.num_prefixes):  # a common prefix is common token by token
        group = [i.prompt_ids for i in shared if i.prefix == prefix]
        assert len(group) > 1
        common = min(len(ids) for ids in group) - 1
        while common and len({ids[:common] for ids in group}) > 1:
            common -= 1
        assert common >= spec.prefix_len - longest_word - 1


def test_open_loop_arrivals_are_seeded_and_increasing() -> None:
    spec = Spec(50, seed=3, rate=20.0, output_len=Dist("fixed", 8))
    items = make_workload(spec, ENCODE)
    arrivals = [i.arrival_s for i in items]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals) and arrivals[-1] > 0
    assert arrivals == [i.arrival_s for i in make_workload(spec, ENCODE)]
    assert [i.max_tokens for i in items] == [8] * 50


def test_bad_options_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "serve", "--policies", "fcfs,lottery"]) == 2
    assert serve.main(["--prompt-len", "uniform:5"]) == 2
    assert serve.main(["--workers", "0"]) == 2
    assert "lottery" in capsys.readouterr().err


# -- real runs -------------------------------------------------------------------------------

SMALL = ["--workers", "4", "--requests", "10", "--prompt-len", "uniform:8:40", "--output-len", "uniform:4:16",
         "--prefix-len", "16", "--shared-prefix", "0.3", "--reps", "1", "--pages", "4M", "--sample-interval", "0.05"]


def test_closed_loop_two_policies_with_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, plots = tmp_path / "serve.json", tmp_path / "plots"
    code = serve.main([*SMALL, "--policies", "fcfs,priority", "--naive-requests", "2", "--json", str(out),
                       "--plot", str(plots), "--verbose", "--instance-prefix", unique_instance("serve")])
    text = capsys.readouterr().out
    assert code == 0
    assert "llmos fcfs" in text and "llmos priority" in text and "Goals" in text
    assert "The seed's metrics per policy" in text  # --verbose: the detailed tables too
    assert text.count("============ Serving Benchmark Result ============") == 2  # one per policy
    report = json.loads(out.read_text())
    assert {"in_process", "naive"} <= set(report)
    assert report["naive"]["requests"] == 2 and report["naive"]["outputs_match_in_process"] == 1.0
    assert report["in_process"]["tokens_per_s"] > 0 and "tokens_per_s_over_naive" in report["in_process"]
    for policy in ("fcfs", "priority"):
        p = report["policies"][policy]
        assert set(SYMBOLS) <= set(p)
        assert p["L_r"] == 0
        assert {"tokens_per_s_over_in_process", "tokens_per_s_over_naive"} <= set(p)
        assert "in_process_met" in report["goals"][policy]
        rows = records(p)
        assert sorted(r["index"] for r in rows) == list(range(10))
        made = sum(r["output_tokens"] for r in rows)
        assert made > 0
        assert p["Q"]["generated_tokens"] == p["Q"]["client_output_tokens"] == made
        assert p["Q"]["finished"] == 10
        assert made == report["in_process"]["generated_tokens"]  # the same tokens, in or out of the OS
        assert p["outputs_match_in_process"] == 1.0
        for r in rows:
            if r["finish_reason"] == "length":
                assert r["output_tokens"] == r["max_tokens"]
            else:
                assert r["finish_reason"] == "stop" and r["output_tokens"] < r["max_tokens"]
            assert r["ttft_s"] is not None and r["queue_s"] is not None and r["stream_ttft_s"] is None
        assert p["latency"]["all"]["requests"] == 10
        summary = p["summary"]  # vLLM's figures, from the same records
        assert summary["completed"] == 10 and summary["failed"] == 0 and summary["total_output_tokens"] == made
        assert summary["mean_ttft_ms"] is not None and summary["mean_itl_ms"] is None  # not streamed
        assert p["cpu"]["runners_s"] >= 0 and "scheduler" in p["cpu"]["by_process_s"]
        assert any(link.startswith("client->scheduler") for link in p["B"]["by_link"])
        assert p["kv_timeline"]
    for name in ("latency_by_class.png", "throughput.png", "kv_use.png"):
        assert (plots / name).read_bytes().startswith(PNG)


def test_open_loop_streaming(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    assert serve.main([*SMALL, "--stream", "--rate", "50", "--policies", "rr", "--naive-requests", "0",
                       "--json", str(out), "--instance-prefix", unique_instance("serve")]) == 0
    report = json.loads(out.read_text())
    assert report["naive"] is None and report["config"]["open_loop"]
    p = report["policies"]["rr"]
    assert p["L_r"] == 0 and p["outputs_match_in_process"] == 1.0
    lat = p["latency"]["all"]
    assert lat["stream_ttft_s"]["n"] == 10 and lat["late_s"]["n"] == 10
    assert p["summary"]["mean_itl_ms"] is not None  # streamed: the gaps between pieces


def test_over_http(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "serve.json"
    assert serve.main([*SMALL, "--http", "--policies", "fcfs", "--naive-requests", "0", "--json", str(out),
                       "--instance-prefix", unique_instance("serve")]) == 0
    text = capsys.readouterr().out
    assert "Serving Benchmark Result" in text and "The seed's metrics" not in text  # tables: --verbose only
    p = json.loads(out.read_text())["policies"]["fcfs"]
    assert p["L_r"] == 0 and "gateway->scheduler" in p["B"]["by_link"]
    assert "gateway" in p["cpu"]["by_process_s"]
    assert p["Q"]["generated_tokens"] == sum(r["output_tokens"] for r in records(p)) > 0
