"""`llmos bench e2e`: aggregate generated tokens/s through the whole system (clients ->
scheduler -> runners -> clients) beside the same model in one process at the same batch.

Runs in the user's shell: starts its own instances (one runner with 32 clients, two
runners with 64 clients) under a private runtime dir, and N client processes using
libllm. Interleaved repetitions; ratios as median [min-max] (docs/design.md, Targets).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llmos.bench.instances import CLI, WAIT, instance
from llmos.bench.report import ratio, table, write_json
from llmos.config import servers_toml
from llmos.microkernel.lifeline import exit_with_parent

CTX = mp.get_context("fork")


def in_process_tokens_per_s(batch: int, max_pos: int) -> float:
    """The same model and the same sampling (temperature 1, a seed per stream) in this
    process: B streams decoded together from position 0, one Model.step per token."""
    import numpy as np

    from llmos.servers.runner.model import Model, SeqChunk
    from llmos.servers.runner.sampling import SamplingParams

    model = Model.load()
    per_seq = model.blocks_needed(max_pos)
    kv = model.new_kv_pool(batch * per_seq)
    tables = [np.arange(i * per_seq, (i + 1) * per_seq, dtype=np.int32) for i in range(batch)]
    sampling = [SamplingParams(temperature=1.0, seed=i * 1000) for i in range(batch)]
    tokens = [1] * batch
    start = time.perf_counter()
    for pos in range(max_pos):
        out = model.step([SeqChunk(tables[i], pos, (tokens[i],), sampling=sampling[i]) for i in range(batch)], kv)
        tokens = out.token_ids.tolist()
    return float(batch * max_pos / (time.perf_counter() - start))


def _client(instance: str, index: int, max_tokens: int, requests: int, barrier: Any, out: Any,
            parent_pid: int) -> None:
    from llmos import libllm

    exit_with_parent(parent_pid, signal.SIGKILL)  # fork copied the parent's SIGTERM handler

    with libllm.connect(instance, timeout=WAIT) as session:
        barrier.wait(WAIT)
        start = time.perf_counter()
        tokens = 0
        for r in range(requests):  # temperature 1, as in-process: the same work per token
            done = session.generate("", max_tokens=max_tokens, temperature=1.0, seed=index * 1000 + r, timeout=WAIT)
            tokens += done.usage.completion_tokens
        out.put((start, time.perf_counter(), tokens))


@contextmanager
def instance_with(runtime: str, num_runners: int, pages: str) -> Iterator[tuple[str, dict[str, str]]]:
    """An instance (memory server, `num_runners` runners, scheduler) under `runtime`;
    yields its name and the environment that reaches it. LLMOS_RUNTIME_DIR is set here too."""
    name = f"bench-{os.getpid()}-{num_runners}-{time.monotonic_ns()}"
    with instance(runtime, name, f'[memory]\npages = "{pages}"\n' + servers_toml(num_runners)):
        yield name, {**os.environ, "LLMOS_RUNTIME_DIR": runtime}


def through_llmos(runtime: str, num_runners: int, num_clients: int, max_tokens: int, requests: int) -> float:
    with instance_with(runtime, num_runners, "32M") as (instance, _env):
        barrier, out = CTX.Barrier(num_clients), CTX.Queue()
        workers = [CTX.Process(target=_client, args=(instance, i, max_tokens, requests, barrier, out, os.getpid()))
                   for i in range(num_clients)]
        for w in workers:
            w.start()
        results = [out.get(timeout=WAIT * 2) for _ in workers]
        for w in workers:
            w.join(WAIT)
    start = min(r[0] for r in results)
    end = max(r[1] for r in results)
    return float(sum(r[2] for r in results) / (end - start))


def _pss_kib(pid: int, path_part: str = "") -> int:
    """Proportional set size of a process (or of its mappings of files matching `path_part`)."""
    total, current = 0, ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0]:
                current = fields[5] if len(fields) > 5 else ""
            elif fields and fields[0] == "Pss:" and (not path_part or path_part in current):
                total += int(fields[1])
    return total


def runner_memory(runtime: str, num_runners: int) -> dict[str, float]:
    """PSS per runner, and of the model's weights within it, with `num_runners` runners:
    weights are mapped (or dequantised into one shared segment), so they split N ways."""

    from llmos.servers.runner.loaders import default_model_path


    with instance_with(runtime, num_runners, "8M") as (instance, env):
        # Enough concurrent work that every runner computes (and so touches every weight page).
        generate = ("import libllm, concurrent.futures as f\n"
                    f"def one(i):\n    with libllm.connect({instance!r}) as s: s.generate('', max_tokens=30, seed=i)\n"
                    f"list(f.ThreadPoolExecutor(8).map(one, range(8 * {num_runners})))\n")
        subprocess.run([sys.executable, "-c", generate], env=env, check=True, capture_output=True, timeout=WAIT)
        status = json.loads(subprocess.run([*CLI, "status", "--instance", instance, "--json"], env=env,
                                            capture_output=True, text=True, timeout=WAIT).stdout)
        pids = [p["pid"] for p in status["processes"] if p["name"].startswith("runner.")]
        model = default_model_path().name
        return {"pss_kib_per_runner": statistics.mean(_pss_kib(pid) for pid in pids),
                "weights_pss_kib_per_runner": statistics.mean(_pss_kib(pid, model) for pid in pids)}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llmos bench e2e", description=__doc__)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clients", type=int, default=32, help="clients per runner")
    p.add_argument("--max-tokens", type=int, default=255, help="tokens per request (positions up to this + 1)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per repetition")
    p.add_argument("--json", metavar="FILE")
    ns = p.parse_args(argv)
    inproc, one, two = [], [], []
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as runtime:
        os.chmod(runtime, 0o700)
        for _rep in range(ns.reps):
            inproc.append(in_process_tokens_per_s(ns.clients, ns.max_tokens + 1))
            one.append(through_llmos(runtime, 1, ns.clients, ns.max_tokens, ns.requests))
            two.append(through_llmos(runtime, 2, 2 * ns.clients, ns.max_tokens, ns.requests))
    rows = [
        [f"in-process, batch {ns.clients}", f"{statistics.median(inproc):,.0f}", "1x"],
        [f"llmos, 1 runner, {ns.clients} clients", f"{statistics.median(one):,.0f}", str(ratio(one, inproc))],
        [f"llmos, 2 runners, {2 * ns.clients} clients", f"{statistics.median(two):,.0f}", str(ratio(two, inproc))],
    ]
    print(f"llmos bench e2e: {ns.reps} interleaved repetitions, {ns.max_tokens} tokens per request\n")
    print(table(["configuration", "generated tok/s", "vs in-process"], rows))
    print(f"\n2 runners over 1 runner: {ratio(two, one)}")
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as runtime:
        os.chmod(runtime, 0o700)
        memory = {n: runner_memory(runtime, n) for n in (1, 2)}
    print("\nRunner memory (PSS): " + "; ".join(
        f"{n} runner(s): {m['pss_kib_per_runner'] / 1024:.1f} MiB each, weights {m['weights_pss_kib_per_runner']:.0f} KiB"
        for n, m in memory.items()))
    write_json(ns.json, {"in_process_tok_s": inproc, "one_runner_tok_s": one, "two_runners_tok_s": two,
                         "one_runner_over_in_process": ratio(one, inproc).median,
                         "two_runners_over_one": ratio(two, one).median, "runner_memory": memory})
    return 0
