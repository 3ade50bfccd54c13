"""Prometheus text for /metrics: the seed's metrics (T_s, Q, U, F, H, L_s, L_r, B) and TTFT
and time-per-token histograms, from the instance's stats. Runs in the gateway process."""

from __future__ import annotations

from typing import Any


def prometheus_text(stats: dict[str, Any]) -> str:
    s, m, k = stats["scheduler"], stats["memory"], stats["kernel"]
    lines: list[str] = []

    def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("llmos_scheduling_delay_steps", "gauge", "T_s: scheduler steps from arrival to first step, by priority",
           [(f'{{priority="{p}",quantile="0.5"}}', v) for p, v in s["delay_p50_steps_by_priority"].items()]
           + [(f'{{priority="{p}",quantile="0.99"}}', v) for p, v in s["delay_p99_steps_by_priority"].items()])
    metric("llmos_requests_finished_total", "counter", "Q: finished requests", [("", s["num_finished"])])
    metric("llmos_generated_tokens_total", "counter", "Q: generated tokens", [("", s["num_generated_tokens"])])
    metric("llmos_runner_busy_seconds_total", "counter", "U: runner compute time (divide by uptime x runners)",
           [("", s["runner_busy_s"])])
    metric("llmos_scheduler_uptime_seconds", "gauge", "scheduler uptime", [("", s["uptime_s"])])
    metric("llmos_kv_blocks", "gauge", "U: KV blocks by state",
           [('{state="used"}', m["num_used_blocks"]), ('{state="free"}', m["num_free_blocks"]),
            ('{state="cached"}', m["num_cached_blocks"]), ('{state="leased"}', m["num_leased_blocks"])])
    metric("llmos_fragmentation_ratio", "gauge", "F: paged (internal) and segment (external) fragmentation",
           [('{kind="paged"}', s["paged_fragmentation"]), ('{kind="segments"}', m["external_fragmentation"])])
    metric("llmos_prefix_cache_hit_ratio", "gauge", "H: prompt tokens served from the prefix cache / looked up",
           [('{cache="scheduler"}', s["prefix_hit_rate"]), ('{cache="memory"}', m["hit_rate"])])
    metric("llmos_preemptions_total", "counter", "preempted sequences", [("", s["num_preemptions"])])
    rings = k["rings"]
    labels = [f'{{channel="{r["channel_id"]}",direction="{r["direction"]}"}}' for r in rings]
    metric("llmos_ring_latency_seconds", "gauge", "L_s: message latency per ring (histogram bucket bounds)",
           [(lb[:-1] + ',quantile="0.5"}', r["latency_p50_ns"] / 1e9) for lb, r in zip(labels, rings, strict=True)]
           + [(lb[:-1] + ',quantile="0.99"}', r["latency_p99_ns"] / 1e9) for lb, r in zip(labels, rings, strict=True)])
    metric("llmos_ring_lost_messages_total", "counter", "L_r numerator: messages missing by per-ring seq",
           [(lb, r["seq_gaps"]) for lb, r in zip(labels, rings, strict=True)])
    metric("llmos_ring_messages_total", "counter", "B: messages through each ring",
           [(lb, r["recv_records"]) for lb, r in zip(labels, rings, strict=True)])
    metric("llmos_ring_bytes_total", "counter", "B: payload bytes through each ring",
           [(lb, r["recv_bytes"]) for lb, r in zip(labels, rings, strict=True)])
    for name, key, doc in (("llmos_ttft_seconds", "ttft_us_log2_hist", "time to first token"),
                           ("llmos_time_per_output_token_seconds", "time_per_token_us_log2_hist",
                            "time per output token after the first")):
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} histogram")
        total = 0
        for bucket, count in enumerate(s[key]):
            total += count
            lines.append(f'{name}_bucket{{le="{2 ** (bucket + 1) / 1e6:g}"}} {total}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {total}')
        lines.append(f"{name}_count {total}")
    return "\n".join(lines) + "\n"
