"""The summary of a `llmos bench serve` run in the shape of `vllm bench serve`'s, so figures
can be set beside vLLM's or llama-server's without translation: the same lines, the same
definitions, the same JSON names. Pure: computed from the records of one run.

Definitions (as vLLM's): failed requests count in neither tokens nor latency; TTFT is
send to first token; TPOT per request is (end to end - TTFT) / (output tokens - 1); ITL
is every gap between two consecutive streamed chunks of every request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llmos.bench.serve_clients import Record

WIDTH = 50


def _ttft(r: Record) -> float | None:
    return r.stream_ttft_s if r.stream_ttft_s is not None else r.ttft_s  # the client's when it streamed


def _tpot(r: Record) -> float | None:
    return r.stream_per_token_s if r.stream_per_token_s is not None else r.per_token_s


def _stats_ms(name: str, values: Sequence[float]) -> dict[str, float | None]:
    data = np.asarray(values, dtype=np.float64) * 1000.0
    if not data.size:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    return {f"mean_{name}_ms": float(data.mean()), f"median_{name}_ms": float(np.median(data)),
            f"p99_{name}_ms": float(np.percentile(data, 99))}


def summarise(records: Sequence[Record], duration_s: float) -> dict[str, Any]:
    """vLLM's result figures (same keys as its `--save-result` JSON) for one run that took
    `duration_s` from its start to its last request's end."""
    ok = [r for r in records if not r.error]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    ttfts = [t for r in ok if (t := _ttft(r)) is not None]
    tpots = [t for r in ok if r.output_tokens > 1 and (t := _tpot(r)) is not None]
    itls = [gap for r in ok for gap in r.itl_s]
    return {"completed": len(ok), "failed": len(records) - len(ok), "duration": duration_s,
            "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
            "request_throughput": len(ok) * per_s, "output_throughput": output_tokens * per_s,
            "total_token_throughput": (input_tokens + output_tokens) * per_s,
            **_stats_ms("ttft", ttfts), **_stats_ms("tpot", tpots), **_stats_ms("itl", itls)}


def _line(label: str, value: float | int | None, digits: int = 2) -> str:
    if value is None:
        text = "n/a"  # not measured (e.g. ITL without streaming), rather than vLLM's 0
    elif isinstance(value, int):
        text = str(value)
    else:
        text = f"{value:.{digits}f}"
    return f"{label:<40} {text:<10}".rstrip()


def _rule(title: str, fill: str) -> str:
    return f"{title:{fill}^{WIDTH}}"


def render_summary(s: dict[str, Any]) -> str:
    """The block `vllm bench serve` prints, line for line (plus Failed requests)."""
    lines = [_rule(" Serving Benchmark Result ", "="),
             _line("Successful requests:", s["completed"]),
             _line("Failed requests:", s["failed"]),
             _line("Benchmark duration (s):", s["duration"]),
             _line("Total input tokens:", s["total_input_tokens"]),
             _line("Total generated tokens:", s["total_output_tokens"]),
             _line("Request throughput (req/s):", s["request_throughput"]),
             _line("Output token throughput (tok/s):", s["output_throughput"]),
             _line("Total token throughput (tok/s):", s["total_token_throughput"])]
    for title, key, name in (("Time to First Token", "ttft", "TTFT"),
                             ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
                             ("Inter-token Latency", "itl", "ITL")):
        lines.append(_rule(title, "-"))
        lines += [_line(f"{stat} {name} (ms):", s[f"{stat.lower()}_{key}_ms"]) for stat in ("Mean", "Median", "P99")]
    lines.append("=" * WIDTH)
    return "\n".join(lines)
