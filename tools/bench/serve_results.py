"""The JSON report of `llmos bench serve`: every figure under a stable name.

Layout: "config", "workload", "in_process" and "naive" (the baselines; "naive" is null
when skipped), "policies" (per policy: the seed's symbols T_s, Q, U, F, H, L_s, L_r, B as
keys, then "latency", "cpu", the throughput ratios "tokens_per_s_over_in_process" and
"tokens_per_s_over_naive" as {median, low, high} over the repetitions, "summary" (the
last repetition's, in `vllm bench serve`'s names: serve_summary), "kv_timeline" and
"records", one row per request), and "goals" (per policy: the two targets and whether
they were met). Pure: built from what the runs measured.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from llmos.bench.report import ratio
from llmos.bench.serve_baselines import InProcessResult, NaiveResult
from llmos.bench.serve_clients import Record
from llmos.bench.serve_metrics import cpu, latency, symbols
from llmos.bench.serve_report import GOAL_IN_PROCESS, GOAL_OUTSIDE_CPU
from llmos.bench.serve_summary import summarise
from llmos.bench.serve_system import SystemRun

median = statistics.median


def records_table(records: Sequence[Record]) -> dict[str, Any]:
    fields = [f.name for f in dataclasses.fields(Record)]
    return {"fields": fields, "rows": [list(dataclasses.astuple(r)) for r in records]}


def share_matching(records: Sequence[Record], digests: dict[int, int]) -> float | None:
    """Share of the requests whose output is token for token the in-process one's (None
    when outputs were not seen, as over HTTP)."""
    known = [r for r in records if r.digest is not None]
    return sum(1 for r in known if digests.get(r.index) == r.digest) / len(known) if known else None


def _ratio(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, float]:
    return dataclasses.asdict(ratio(numerators, denominators))


def in_process_section(runs: Sequence[InProcessResult], workers: int) -> dict[str, Any]:
    last = runs[-1]
    return {"tokens_per_s": median(r.tokens_per_s for r in runs), "tokens_per_s_reps": [r.tokens_per_s for r in runs],
            "requests_per_s": median(r.requests_per_s for r in runs), "generated_tokens": last.generated_tokens,
            "wall_s": last.wall_s, "batch": workers}


def naive_section(naive: NaiveResult, in_process: Sequence[InProcessResult]) -> dict[str, Any]:
    rates = [r.tokens_per_s for r in in_process]
    return {"requests": len(naive.records), "tokens_per_s": naive.tokens_per_s,
            "requests_per_s": naive.requests_per_s, "generated_tokens": naive.generated_tokens,
            "wall_s": naive.wall_s, "server_cpu_s": naive.server_cpu_s, "latency": latency(naive.records),
            "tokens_per_s_over_in_process": _ratio([naive.tokens_per_s] * len(rates), rates),
            "outputs_match_in_process": share_matching(naive.records, in_process[-1].digests),
            "records": records_table(naive.records)}


def policy_section(reps: Sequence[SystemRun], in_process: Sequence[InProcessResult],
                   naive: NaiveResult | None) -> dict[str, Any]:
    """One policy's figures: those of its last repetition, and the ratios (throughput and
    CPU outside the runners) over every repetition."""
    every = [symbols(r) for r in reps]
    figures, last = every[-1], reps[-1]
    rates = [f["Q"]["tokens_per_s"] for f in every]
    cpus = [cpu(r, f["Q"]["generated_tokens"]) for r, f in zip(reps, every, strict=True)]
    outside = [c["outside_over_runners"] for c in cpus]
    return {
        **figures, "latency": latency(last.records), "cpu": cpus[-1],
        "tokens_per_s": median(rates), "tokens_per_s_reps": rates,
        "requests_per_s": median(f["Q"]["requests_per_s"] for f in every),
        "tokens_per_s_over_in_process": _ratio(rates, [r.tokens_per_s for r in in_process]),
        "tokens_per_s_over_naive": _ratio(rates, [naive.tokens_per_s] * len(rates)) if naive else None,
        "outside_over_runners": {"median": median(outside), "low": min(outside), "high": max(outside)},
        "outputs_match_in_process": share_matching(last.records, in_process[-1].digests),
        "summary": summarise(last.records, last.wall_s), "kv_timeline": last.samples, "records": records_table(last.records)}


def goals(policy: dict[str, Any]) -> dict[str, Any]:
    over_ip = policy["tokens_per_s_over_in_process"]["median"]
    outside = policy["outside_over_runners"]["median"]
    naive = policy["tokens_per_s_over_naive"]
    return {"tokens_per_s_over_in_process": over_ip, "in_process_met": over_ip >= GOAL_IN_PROCESS,
            "outside_over_runners": outside, "outside_cpu_met": outside <= GOAL_OUTSIDE_CPU,
            "tokens_per_s_over_naive": naive["median"] if naive else None}


def build(config: dict[str, Any], workload: dict[str, Any], in_process: Sequence[InProcessResult],
          runs: dict[str, list[SystemRun]], naive: NaiveResult | None) -> dict[str, Any]:
    policies = {name: policy_section(reps, in_process, naive) for name, reps in runs.items()}
    section = in_process_section(in_process, config["workers"])
    if naive is not None:
        section["tokens_per_s_over_naive"] = _ratio([r.tokens_per_s for r in in_process],
                                                    [naive.tokens_per_s] * len(in_process))
    return {"config": config, "workload": workload, "in_process": section,
            "naive": naive_section(naive, in_process) if naive is not None else None,
            "policies": policies, "goals": {name: goals(p) for name, p in policies.items()}}
