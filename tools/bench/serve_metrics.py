"""The figures of `llmos bench serve`, computed from one run's records and stats.

Pure: no I/O. The seed's metrics as docs/metrics.md defines them (keys are its symbols: T_s, Q,
U, F, H, L_s, L_r, B), the latency figures users compare (TTFT, time per output token,
end to end; p50/p99 overall and per priority class), and the CPU the operating system
spent (every instance process but the runners) per generated token.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from llmos.bench.serve_clients import Record
from llmos.bench.serve_system import SystemRun

LATENCIES = ("queue_s", "ttft_s", "per_token_s", "e2e_s", "stream_ttft_s", "stream_per_token_s", "late_s")
_RANK = {"client": 0, "gateway": 1, "scheduler": 2, "memory": 3, "runner": 3}


def summary(values: Iterable[float | None]) -> dict[str, float] | None:
    """p50, p99 and mean of the values that were measured; None if none were."""
    data = np.array([v for v in values if v is not None], dtype=np.float64)
    if not data.size:
        return None
    return {"p50": float(np.percentile(data, 50)), "p99": float(np.percentile(data, 99)),
            "mean": float(data.mean()), "n": int(data.size)}


def latency(records: Sequence[Record]) -> dict[str, Any]:
    """Per latency figure, a summary; overall ("all") and per priority class."""
    groups: dict[str, list[Record]] = {"all": list(records)}
    for r in records:
        groups.setdefault(str(r.priority), []).append(r)
    out: dict[str, Any] = {}
    for name, group in groups.items():
        figures: dict[str, Any] = {"requests": len(group), "output_tokens": sum(r.output_tokens for r in group)}
        for field in LATENCIES:
            figures[field] = summary(getattr(r, field) for r in group)
        out[name] = figures
    return out


def _delta(after: dict[str, Any], before: dict[str, Any], key: str) -> float:
    return float(after.get(key, 0) or 0) - float(before.get(key, 0) or 0)


def _role(name: str) -> str:
    if not name:
        return "client"
    return "runner" if name.startswith("runner.") else name


def _weighted_median(values: Sequence[tuple[float, float]]) -> float:
    """Median of `value` weighted by `weight`, over (value, weight) pairs."""
    ordered = sorted((v, w) for v, w in values if w > 0)
    if not ordered:
        return 0.0
    half, seen = sum(w for _, w in ordered) / 2, 0.0
    for value, weight in ordered:
        seen += weight
        if seen >= half:
            return value
    return ordered[-1][0]


def rings(before: dict[str, Any], after: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """L_s, L_r and B from the kernel's ring counters, overall and per link (e.g.
    "client->scheduler"). Counts are over the run (after minus before); the latency
    percentiles are the rings' own (log2-histogram bucket bounds, over each ring's life):
    p50 is the median of the rings' p50s weighted by their messages, p99 the largest p99."""
    ends: dict[int, list[str]] = defaultdict(list)
    for endpoint in after["endpoints"]:
        for channel in endpoint["channels"]:
            ends[channel].append(_role(endpoint["name"]))
    old = {(r["channel_id"], r["direction"]): r for r in before["rings"]}
    links: dict[str, dict[str, Any]] = {}
    for ring in after["rings"]:
        prior = old.get((ring["channel_id"], ring["direction"]), {})
        if ring["sent_records"] < prior.get("sent_records", 0):
            prior = {}  # a new ring under a reused channel id
        roles = sorted(ends.get(ring["channel_id"], []), key=lambda r: _RANK.get(r, 9))
        low, high = [*roles, "?", "?"][:2]
        link = f"{low}->{high}" if ring["direction"] == "request" else f"{high}->{low}"
        entry = links.setdefault(link, {"rings": 0, "messages": 0, "bytes": 0, "received": 0, "seq_gaps": 0,
                                        "p50s": [], "p99_ns": 0})
        messages = ring["sent_records"] - prior.get("sent_records", 0)
        received = ring["latency_count"] - prior.get("latency_count", 0)
        entry["rings"] += 1
        entry["messages"] += messages
        entry["bytes"] += ring["sent_bytes"] - prior.get("sent_bytes", 0)
        entry["received"] += received
        entry["seq_gaps"] += ring["seq_gaps"] - prior.get("seq_gaps", 0)
        entry["p50s"].append((ring["latency_p50_ns"], received))
        if received:
            entry["p99_ns"] = max(entry["p99_ns"], ring["latency_p99_ns"])
    by_link = {}
    for link, e in sorted(links.items()):
        expected = e["received"] + e["seq_gaps"]
        by_link[link] = {"rings": e["rings"], "messages": e["messages"], "bytes": e["bytes"],
                         "messages_per_s": e["messages"] / wall_s, "bytes_per_s": e["bytes"] / wall_s,
                         "p50_us": _weighted_median(e["p50s"]) / 1000, "p99_us": e["p99_ns"] / 1000,
                         "loss_rate": e["seq_gaps"] / expected if expected else 0.0}
    received = sum(e["received"] for e in links.values())
    gaps = sum(e["seq_gaps"] for e in links.values())
    all_p50s = [p for e in links.values() for p in e["p50s"]]
    return {
        "L_s": {"p50_us": _weighted_median(all_p50s) / 1000,
                "p99_us": max((e["p99_ns"] for e in links.values()), default=0) / 1000,
                "by_link": {k: {"p50_us": v["p50_us"], "p99_us": v["p99_us"]} for k, v in by_link.items()}},
        "L_r": gaps / (received + gaps) if received + gaps else 0.0,
        "B": {"messages_per_s": sum(e["messages"] for e in links.values()) / wall_s,
              "bytes_per_s": sum(e["bytes"] for e in links.values()) / wall_s,
              "by_link": {k: {"messages_per_s": v["messages_per_s"], "bytes_per_s": v["bytes_per_s"],
                              "messages": v["messages"], "bytes": v["bytes"], "rings": v["rings"]}
                          for k, v in by_link.items()}},
        "seq_gaps": gaps,
    }


def symbols(run: SystemRun) -> dict[str, Any]:
    """The seed's metrics for one run, keyed by their symbols (plus preemptions)."""
    s0, s1 = run.before["scheduler"], run.after["scheduler"]
    m1 = run.after["memory"]
    wall = run.wall_s
    generated = int(_delta(s1, s0, "num_generated_tokens"))
    finished = int(_delta(s1, s0, "num_finished"))
    by_class: dict[str, Any] = {}
    for priority, p50 in s1.get("delay_p50_steps_by_priority", {}).items():
        queue = summary(r.queue_s for r in run.records if str(r.priority) == str(priority))
        by_class[str(priority)] = {"p50_steps": p50, "p99_steps": s1["delay_p99_steps_by_priority"][priority],
                                   "p50_s": queue and queue["p50"], "p99_s": queue and queue["p99"]}
    queue_all = summary(r.queue_s for r in run.records)
    running = run.samples[1:-1] or run.samples  # the samples taken while it ran
    shares = [x["kv_share"] for x in running]
    lookups = int(_delta(s1, s0, "num_prefix_lookup_tokens"))
    hits = int(_delta(s1, s0, "num_prefix_hit_tokens"))
    h = {"hit_rate": hits / lookups if lookups else 0.0, "lookup_tokens": lookups, "hit_tokens": hits,
         "source": "scheduler"}
    return {
        "T_s": {"p50_steps": s1["delay_p50_steps"], "p99_steps": s1["delay_p99_steps"],
                "p50_s": queue_all and queue_all["p50"], "p99_s": queue_all and queue_all["p99"],
                "by_priority": by_class},
        "Q": {"requests_per_s": finished / wall, "tokens_per_s": generated / wall, "finished": finished,
              "generated_tokens": generated, "client_output_tokens": sum(r.output_tokens for r in run.records),
              "wall_s": wall},
        "U": {"runners": _delta(s1, s0, "runner_busy_s") / wall / max(1, int(s1.get("num_runners", 1))),
              "kv_mean": float(np.mean(shares)), "kv_peak": float(np.max(shares))},
        "F": {"paged": float(np.mean([x["paged_fragmentation"] for x in running])),
              "segments": m1["external_fragmentation"]},
        "H": h,
        **rings(run.before["kernel"], run.after["kernel"], wall),
        "preemptions": int(_delta(s1, s0, "num_preemptions")),
        "yields": int(_delta(s1, s0, "num_yields")),
    }


def cpu(run: SystemRun, generated_tokens: int) -> dict[str, Any]:
    """CPU seconds of the instance's processes over the run: the runners', and everything
    else's (kernel, memory, scheduler, supervisor, gateway: the operating system's cost),
    per generated token and as a share of the runners'; the clients' (libllm) apart."""
    runners = sum(v for k, v in run.cpu_s.items() if k.startswith("runner."))
    outside = sum(v for k, v in run.cpu_s.items() if not k.startswith("runner."))
    clients = sum(run.client_cpu_s)
    per_token = 1.0 / generated_tokens if generated_tokens else 0.0
    return {"by_process_s": {k: round(v, 3) for k, v in sorted(run.cpu_s.items())}, "runners_s": runners, "outside_runners_s": outside,
            "outside_over_runners": outside / runners if runners else 0.0,
            "outside_us_per_token": outside * per_token * 1e6, "runners_us_per_token": runners * per_token * 1e6,
            "clients_s": clients, "clients_us_per_token": clients * per_token * 1e6}
