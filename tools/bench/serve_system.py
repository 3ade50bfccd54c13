"""One measured run of the system under test for `llmos bench serve`: a fresh instance
with the given policy under a private runtime dir, the workers, and what the instance
reports before and after (libllm `stats()`), its KV use sampled while it runs, and the
CPU time of each of its processes. Runs in the benchmark's process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmos.bench.instances import WAIT, instance
from llmos.bench.serve_clients import ClientSpec, Record
from llmos.bench.serve_harness import Harness
from llmos.bench.serve_workload import WorkItem
from llmos.config import servers_toml
from llmos.lifecycle import cpu_seconds


@dataclass(slots=True, frozen=True)
class RunOptions:
    workers: int = 32
    runners: int = 1
    pages: str = "32M"
    http: bool = False
    stream: bool = False
    open_loop: bool = False
    sample_s: float = 0.5  # how often the instance's KV use is sampled
    threads: int = 1  # per runner


@dataclass(slots=True, frozen=True)
class SystemRun:
    """What one run of one policy measured (stats dicts as libllm's `Session.stats()`)."""

    policy: str
    records: list[Record]
    client_cpu_s: list[float]  # per worker, from its start to its last request's end
    wall_s: float  # start to the last request's end
    before: dict[str, Any]  # stats once every worker was connected
    after: dict[str, Any]  # stats once every request had finished (workers still connected)
    cpu_s: dict[str, float]  # CPU seconds per instance process over the run
    samples: list[dict[str, float]]  # the KV timeline


def config_text(policy: str, options: RunOptions) -> str:
    head = (f'[model]\nthreads = {options.threads}\n[memory]\npages = "{options.pages}"\n'
            f'[scheduler]\npolicy = "{policy}"\n')
    if options.http:
        head += "[gateway]\nport = 0\n"  # a free port, written to the run dir's gateway.url
    return head + servers_toml(options.runners, gateway=options.http)


def process_pids(name: str) -> dict[str, int]:
    """Pid of every process of the instance (as `llmos status --json` lists them), and the
    supervisor's."""
    from llmos.lifecycle import status_report

    report = status_report(name)
    pids = {p["name"]: int(p["pid"]) for p in report["processes"] if p["alive"]}
    if isinstance(report.get("supervisor_pid"), int):
        pids["supervisor"] = report["supervisor_pid"]
    return pids


def kv_sample(stats: dict[str, Any], t: float) -> dict[str, float]:
    """A point of the KV timeline: blocks the scheduler's sequences hold (its lease minus
    what it could hand out) out of the pool, and paged F then (the scheduler's, which knows
    how full its blocks are)."""
    s, m = stats["scheduler"], stats["memory"]
    held = s["num_leased_blocks"] - s["num_free_blocks"]
    return {"t_s": t, "blocks_held": held, "blocks_total": m["num_blocks"],
            "kv_share": held / m["num_blocks"] if m["num_blocks"] else 0.0,
            "running": s["num_running"], "waiting": s["num_waiting"],
            "paged_fragmentation": s["paged_fragmentation"]}


def run_system(policy: str, items: Sequence[WorkItem], options: RunOptions, runtime: str, name: str,
               progress: Callable[[int], None], config: str | None = None) -> SystemRun:
    """Start an instance with `policy` (or the whole `config`), run the workload through it,
    stop it. `progress(output tokens made so far)` moves as the instance reports them."""
    from llmos import libllm
    from llmos.microkernel import instance as I

    with instance(runtime, name, config or config_text(policy, options)) as inst:
        pids = process_pids(inst)
        url = (I.run_dir(inst) / "gateway.url").read_text().strip() if options.http else ""
        spec = ClientSpec("http" if options.http else "libllm", inst, url, options.stream, options.open_loop)
        with Harness(spec, items, options.workers) as harness, libllm.connect(inst, timeout=WAIT) as session:
            harness.ready()
            before = session.stats()
            cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
            t0 = harness.go()
            samples = [kv_sample(before, 0.0)]
            next_sample = t0 + options.sample_s

            made_before = before["scheduler"]["num_generated_tokens"]

            def tick(done: int) -> None:
                nonlocal next_sample
                now = time.monotonic()
                if now >= next_sample and done < len(items):
                    stats = session.stats()
                    samples.append(kv_sample(stats, now - t0))
                    progress(stats["scheduler"]["num_generated_tokens"] - made_before)
                    next_sample = now + options.sample_s

            records, client_cpu = harness.collect(tick)
            progress(sum(r.output_tokens for r in records))
            cpu1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
            after = session.stats()
    wall = max(r.start_s + r.e2e_s for r in records)
    samples.append(kv_sample(after, wall))
    return SystemRun(policy, records, client_cpu, wall, before, after,
                     {n: cpu1[n] - cpu0[n] for n in pids}, samples)
