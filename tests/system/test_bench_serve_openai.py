"""`llmos bench serve --base-url`: the seeded workload against a running llmos gateway, as
against any OpenAI-compatible server, and what a server that refuses gives (failed
requests counted, a clear message, exit 1). Never asserts time."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.bench import serve
from llmos.bench.serve_clients import PieceClock
from llmos.bench.serve_openai import Refused, StreamState, api_root
from llmos.config import servers_toml
from tests.system.cli import running_instance, scheduler_stats

pytestmark = pytest.mark.slow
CONFIG = '[memory]\npages = "8M"\n[gateway]\nport = 0\n' + servers_toml(1, gateway=True)
SMALL = ["--workers", "4", "--requests", "8", "--prompt-len", "uniform:8:40", "--output-len", "uniform:4:16",
         "--prefix-len", "16"]
LABELS = ("Successful requests", "Failed requests", "Benchmark duration (s)", "Total input tokens",
          "Total generated tokens", "Request throughput (req/s)", "Output token throughput (tok/s)",
          "Total token throughput (tok/s)", "Mean TTFT (ms)", "Median TTFT (ms)", "P99 TTFT (ms)",
          "Mean TPOT (ms)", "Median TPOT (ms)", "P99 TPOT (ms)", "Mean ITL (ms)", "Median ITL (ms)", "P99 ITL (ms)")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with running_instance(tmp_path_factory, CONFIG, "bso") as instance:
        url = (Path(os.environ["LLMOS_RUNTIME_DIR"]) / instance / "gateway.url").read_text().strip()
        yield instance, url


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound but not listening: connections to it are refused, and no one else takes it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def figures(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z][^:\n]+):\s+(\S+)$", text, flags=re.MULTILINE))


@pytest.mark.parametrize("loop", [[], ["--rate", "200"]], ids=["closed", "open"])
def test_workload_against_an_llmos_gateway(gateway: tuple[str, str], loop: list[str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    instance, url = gateway
    out = tmp_path / "serve.json"
    made_before = scheduler_stats(instance)["num_generated_tokens"]
    code = serve.main([*SMALL, *loop, "--base-url", url + "/v1", "--temperature", "0", "--json", str(out)])
    made = scheduler_stats(instance)["num_generated_tokens"] - made_before
    text = capsys.readouterr().out
    assert code == 0
    assert "============ Serving Benchmark Result ============" in text and "(model stories260K)" in text
    shown = figures(text)
    for label in LABELS:
        float(shown[label])  # every line there, every value a number
    report = json.loads(out.read_text())
    s = report["summary"]
    assert s["completed"] == 8 and s["failed"] == 0 and report["errors"] == {}
    assert s["total_output_tokens"] == made > 0  # what the server says it generated, token for token
    assert int(shown["Total generated tokens"]) == made and int(shown["Failed requests"]) == 0
    assert s["total_input_tokens"] == report["workload"]["prompt_tokens"]  # the workload's prompts, as sent
    rows = [dict(zip(report["records"]["fields"], row, strict=True)) for row in report["records"]["rows"]]
    assert sorted(r["index"] for r in rows) == list(range(8))
    for r in rows:
        assert 1 <= r["output_tokens"] <= r["max_tokens"] and r["output_tokens_from"] in ("usage", "chunks")
        assert r["stream_ttft_s"] is not None and r["error"] == ""
    assert report["config"]["model"] == "stories260K" and report["config"]["base_url"] == url


def test_a_wrong_model_is_counted_failed(gateway: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, url = gateway
    assert serve.main([*SMALL, "--base-url", url, "--model", "gpt-9"]) == 1
    out, err = capsys.readouterr()
    shown = figures(out)
    assert shown["Successful requests"] == "0" and shown["Failed requests"] == "8"
    assert shown["Mean TTFT (ms)"] == "n/a"
    assert "8 of 8 requests" in err and "HTTP 404" in err and "gpt-9" in err and "Traceback" not in err


def test_nothing_listening(closed_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port}"
    assert serve.main([*SMALL, "--base-url", url, "--model", "any"]) == 1
    out, err = capsys.readouterr()
    assert figures(out)["Failed requests"] == "8"
    assert "8 of 8 requests" in err and "ConnectError" in err and "Traceback" not in err
    assert serve.main([*SMALL, "--base-url", url]) == 1  # no model named: asking for one fails first
    out, err = capsys.readouterr()
    assert "Serving Benchmark Result" not in out
    assert "cannot list the models" in err and "--model" in err and "Traceback" not in err


def test_options_that_need_an_instance_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert serve.main(["--base-url", "http://127.0.0.1:1", "--http"]) == 2
    assert serve.main(["--base-url", "127.0.0.1:8080"]) == 2
    assert "--base-url" in capsys.readouterr().err
    assert api_root("http://h:1/v1/") == api_root("http://h:1/") == "http://h:1"


def test_usage_counts_over_chunks_and_a_cut_stream_is_refused() -> None:
    """The stream of a server that sends usage (OpenAI's shape: a last chunk with no
    choices), and one that stops before its end."""
    stream, clock = StreamState(), PieceClock()
    lines = ['data: {"choices": [{"index": 0, "text": " Once", "finish_reason": null}]}', "",
             ": keep-alive", 'data: {"choices": [{"index": 0, "text": " upon a", "finish_reason": "length"}]}',
             'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}', "data: [DONE]"]
    assert [stream.feed(line, clock) for line in lines] == [False] * 5 + [True]
    assert (stream.chunks, stream.usage_tokens, stream.prompt_tokens, stream.reason) == (2, 3, 5, "length")
    assert len(clock.gaps) == 1 and stream.ended
    cut = StreamState()
    cut.feed('data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}', PieceClock())
    assert not cut.ended
    with pytest.raises(Refused, match="boom"):
        cut.feed('data: {"error": {"message": "boom", "type": "server_error"}}', PieceClock())
