"""Prometheus text for /metrics. Runs in the gateway process.

Two kinds: what the gateway itself sees of its HTTP requests (end-to-end latency, time to
first token, inter-token latency, tokens in and out, finish reasons, its event loop's lag),
named as vLLM names them so the dashboards and autoscalers written for vLLM read them as
they are; and the instance's own figures from its stats (the seed's metrics: T_s, Q, U, F,
H, L_s, L_r, B), under llmos_ names; or, at a cluster's front door, the cluster's (instances,
requests routed to each, failovers).
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


class Histogram:
    """Cumulative buckets with _sum and _count, as Prometheus histograms are."""

    def __init__(self, bounds: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels},le="{le}"}} {total}')
        out += [f"{name}_sum{{{labels}}} {self.sum}", f"{name}_count{{{labels}}} {self.count}"]
        return out


class GatewayMetrics:
    """What the gateway measures of the requests it serves (one per gateway)."""

    def __init__(self, model_name: str) -> None:
        self.labels = f'model_name="{model_name}"'
        self.e2e = Histogram()
        self.ttft = Histogram()
        self.itl = Histogram()
        self.loop_lag = Histogram((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter[str] = Counter()

    def request_done(self, prompt_tokens: int, generation_tokens: int, finish_reason: str, e2e_s: float) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens
        self.finished[finish_reason] += 1
        self.e2e.observe(e2e_s)

    def text(self, stats: dict[str, Any] | None) -> str:
        """`stats`: one instance's (Session.stats), or {"cluster": ...} at a front door, or None."""
        lines: list[str] = []
        cluster = stats.get("cluster") if stats is not None else None
        if cluster is not None:
            stats = None
        if stats is not None:
            s, m = stats["scheduler"], stats["memory"]
            blocks = m["num_blocks"]
            for name, doc, value in (
                    ("vllm:num_requests_running", "Requests in the running batch.", s["num_running"]),
                    ("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s["num_waiting"]),
                    ("vllm:kv_cache_usage_perc", "Share of KV blocks holding requests' tokens (1 = full).",
                     s["num_kv_blocks_held"] / blocks if blocks else 0.0)):
                lines += head_of(name, "gauge", doc)
                lines.append(f"{name}{{{self.labels}}} {value}")
        for name, doc, value in (
                ("vllm:prompt_tokens_total", "Prompt tokens of finished HTTP requests.", self.prompt_tokens),
                ("vllm:generation_tokens_total", "Tokens generated for HTTP requests.", self.generation_tokens)):
            lines += head_of(name, "counter", doc)
            lines.append(f"{name}{{{self.labels}}} {value}")
        lines += head_of("vllm:request_success_total", "counter", "Finished HTTP requests (choices) by finish reason.")
        lines += [f'vllm:request_success_total{{{self.labels},finished_reason="{r}"}} {n}'
                  for r, n in sorted(self.finished.items())]
        for name, hist, doc in (
                ("vllm:e2e_request_latency_seconds", self.e2e, "HTTP request latency, arrival to last token."),
                ("vllm:time_to_first_token_seconds", self.ttft, "Streamed requests: arrival to first token."),
                ("vllm:inter_token_latency_seconds", self.itl, "Streamed requests: time between tokens."),
                ("llmos_gateway_event_loop_lag_seconds", self.loop_lag,
                 "How late the gateway's event loop ran a timer (a blocked loop shows here).")):
            lines += head_of(name, "histogram", doc)
            lines += hist.lines(name, self.labels)
        if stats is not None:
            lines += instance_metrics(stats)
        if cluster is not None:
            lines += cluster_metrics(cluster)
        return "\n".join(lines) + "\n"


def head_of(name: str, kind: str, doc: str) -> list[str]:
    return [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]


def instance_metrics(stats: dict[str, Any]) -> list[str]:
    """The instance's figures from its stats: the seed's metrics (docs/metrics.md defines each)."""
    s, m, k = stats["scheduler"], stats["memory"], stats["kernel"]
    lines: list[str] = []

    def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
        lines.extend(head_of(name, kind, doc))
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("llmos_scheduling_delay_steps", "gauge",
           "T_s: scheduler steps from a request's arrival to its first step (recent window), by priority",
           [(f'{{priority="{p}",quantile="0.5"}}', v) for p, v in s["delay_p50_steps_by_priority"].items()]
           + [(f'{{priority="{p}",quantile="0.99"}}', v) for p, v in s["delay_p99_steps_by_priority"].items()])
    metric("llmos_requests_finished_total", "counter", "Q: requests the scheduler finished (every client)",
           [("", s["num_finished"])])
    metric("llmos_generated_tokens_total", "counter", "Q: tokens the scheduler generated (every client)",
           [("", s["num_generated_tokens"])])
    metric("llmos_runner_busy_seconds_total", "counter",
           "U: seconds runners spent computing steps (divide by uptime x runners for utilisation)",
           [("", s["runner_busy_s"])])
    metric("llmos_scheduler_uptime_seconds", "gauge", "seconds since the scheduler started", [("", s["uptime_s"])])
    metric("llmos_kv_blocks", "gauge",
           "U: KV blocks by state (used includes the scheduler's lease of free blocks, leased counts that lease)",
           [('{state="used"}', m["num_used_blocks"]), ('{state="free"}', m["num_free_blocks"]),
            ('{state="leased"}', m["num_leased_blocks"])])
    metric("llmos_fragmentation_ratio", "gauge",
           "F: share of KV slots held but empty (paged), and of free segment memory unusable for the largest "
           "request (segments)",
           [('{kind="paged"}', s["paged_fragmentation"]), ('{kind="segments"}', m["external_fragmentation"])])
    metric("llmos_prefix_cache_hit_ratio", "gauge", "H: prompt tokens found in the prefix cache / tokens looked up",
           [('{cache="scheduler"}', s["prefix_hit_rate"])])
    metric("llmos_preemptions_total", "counter", "sequences whose KV blocks were taken (they recompute)",
           [("", s["num_preemptions"])])
    rings = k["rings"]
    labels = [f'{{channel="{r["channel_id"]}",direction="{r["direction"]}"}}' for r in rings]
    metric("llmos_ring_latency_seconds", "gauge", "L_s: message latency through each ring, send to receive",
           [(lb[:-1] + ',quantile="0.5"}', r["latency_p50_ns"] / 1e9) for lb, r in zip(labels, rings, strict=True)]
           + [(lb[:-1] + ',quantile="0.99"}', r["latency_p99_ns"] / 1e9) for lb, r in zip(labels, rings, strict=True)])
    metric("llmos_ring_lost_messages_total", "counter", "L_r: messages missing by each ring's sequence numbers",
           [(lb, r["seq_gaps"]) for lb, r in zip(labels, rings, strict=True)])
    metric("llmos_ring_messages_total", "counter", "B: messages through each ring",
           [(lb, r["recv_records"]) for lb, r in zip(labels, rings, strict=True)])
    metric("llmos_ring_bytes_total", "counter", "B: payload bytes through each ring",
           [(lb, r["recv_bytes"]) for lb, r in zip(labels, rings, strict=True)])
    for name, key, doc in (("llmos_ttft_seconds", "ttft_us_log2_hist",
                            "scheduler's time to first token, every client (log2 buckets)"),
                           ("llmos_time_per_output_token_seconds", "time_per_token_us_log2_hist",
                            "scheduler's time per output token after the first, every client (log2 buckets)")):
        lines.extend(head_of(name, "histogram", doc))
        total = 0
        for bucket, count in enumerate(s[key]):
            total += count
            lines.append(f'{name}_bucket{{le="{2 ** (bucket + 1) / 1e6:g}"}} {total}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {total}')
        lines.append(f"{name}_count {total}")
    return lines


def cluster_metrics(cluster: dict[str, Any]) -> list[str]:
    """A front door's figures of the cluster (libllm.cluster_aio's stats)."""
    lines = head_of("llmos_cluster_instances", "gauge", "Instances the front door routes to now (live, same model).")
    lines.append(f"llmos_cluster_instances {cluster['instances']}")
    lines += head_of("llmos_cluster_failovers_total", "counter",
                     "Requests resubmitted on another instance after theirs failed (text unchanged).")
    lines.append(f"llmos_cluster_failovers_total {cluster['failovers']}")
    for name, key, kind, doc in (
            ("llmos_cluster_routed_total", "routed", "counter", "Requests routed to each live instance."),
            ("llmos_cluster_affine_total", "affine", "counter",
             "Of those, routed there as their prompt prefix's preferred instance."),
            ("llmos_cluster_open_requests", "open", "gauge", "Requests open at each live instance now.")):
        lines += head_of(name, kind, doc)
        lines += [f'{name}{{instance="{instance}"}} {placed[key]}'
                  for instance, placed in sorted(cluster["placements"].items())]
    return lines
