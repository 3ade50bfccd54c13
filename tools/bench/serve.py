"""`llmos bench serve`: a serving benchmark of the whole system beside its baselines.

N worker processes (default 32) send one seeded workload (prompt and output lengths from
distributions, priority classes, a share of requests that start with a common prefix,
a sampling seed each) through libllm (or the HTTP gateway with --http), closed loop (each
worker sends its next request when the last one finished; `--requests` is the total) or
open loop (`--rate`: Poisson arrivals). Each policy runs on a fresh instance (one runner
by default) under a private runtime dir. The same workload also runs through the same
model in this process with a continuous batch of N (no operating system: the ideal) and
through a naive server (one process, one request at a time, multiprocessing.Queue in and
out; `--naive-requests` of the workload). Reported: the seed's metrics (T_s, Q, U, F, H,
L_s, L_r, B; docs/design.md), TTFT, time per output token and end-to-end latency (p50/p99, per
priority class and per policy), the ratios to the baselines, and the CPU the operating
system spends outside the runners per generated token. `--json FILE` has every figure
under stable names; `--plot DIR` writes PNG charts. With `--reps N` the in-process
baseline and the policies run N times interleaved (the naive server once), ratios as
median [range]; other figures are the last repetition's.

Printed: per policy, a summary in the shape of `vllm bench serve`'s (serve_summary); the
tables above with `--verbose`. With `--base-url URL` the same workload goes instead to any
OpenAI-compatible server already running there (llmos's gateway, llama.cpp's
llama-server, ...; serve_openai): streaming /v1/completions from the same workers, no
instance and no baselines, and the summary of what the clients saw. A run where any
request failed exits 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from llmos.bench.report import write_json
from llmos.bench.serve_report import render, render_external
from llmos.bench.serve_workload import (
    Spec,
    WorkItem,
    WorkloadError,
    describe,
    make_workload,
    parse_dist,
    parse_priorities,
)
from llmos.servers.scheduler.settings import POLICIES


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmos bench serve", description=__doc__, formatter_class=_Formatter)
    p.add_argument("--workers", type=int, default=32, help="client processes (and the in-process batch size)")
    p.add_argument("--requests", type=int, default=None, help="requests in the workload (None: 16 per worker)")
    p.add_argument("--policies", default="fcfs", help="comma-separated, each on a fresh instance: fcfs,priority,rr,fair")
    p.add_argument("--runners", type=int, default=1, help="runner processes per instance")
    p.add_argument("--threads", type=int, default=1, help="threads per runner ([model] threads)")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: Poisson arrivals per second (0: closed loop)")
    p.add_argument("--prompt-len", default="uniform:16:128", help="tokens: fixed:N, uniform:LO:HI, lognormal:MEAN:SIGMA")
    p.add_argument("--output-len", default="uniform:32:256", help="max_tokens, as --prompt-len")
    p.add_argument("--priorities", default="0:0.8,2:0.2", help="priority classes with weights")
    p.add_argument("--shared-prefix", type=float, default=0.25, help="share of requests starting with a common prefix")
    p.add_argument("--num-prefixes", type=int, default=4, help="how many common prefixes")
    p.add_argument("--prefix-len", type=int, default=64, help="tokens of each common prefix")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0, help="the workload's seed (everything is drawn from it)")
    p.add_argument("--stream", action="store_true", help="stream tokens (TTFT/TPOT also timed by the client)")
    p.add_argument("--http", action="store_true", help="through the HTTP gateway (no priorities there)")
    p.add_argument("--naive-requests", type=int, default=64, help="requests the naive server serves (0: skip it)")
    p.add_argument("--reps", type=int, default=5,
                   help="interleaved repetitions of the in-process baseline and the policies (ratios: median [range])")
    p.add_argument("--pages", default="32M", help="KV pages of each instance ([memory] pages)")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 4 requests per worker, outputs uniform:16:64, one repetition, naive <= 16")
    p.add_argument("--sample-interval", type=float, default=0.5, help="seconds between KV-use samples")
    p.add_argument("--instance-prefix", default=f"bench-serve-{os.getpid()}", help="instances are named PREFIX-POLICY-REP")
    p.add_argument("--json", metavar="FILE", help="write every figure here")
    p.add_argument("--plot", metavar="DIR", help="write PNG charts here (needs matplotlib)")
    p.add_argument("--verbose", action="store_true", help="also the detailed tables (latency per class, the "
                   "seed's metrics, rings, CPU)")
    p.add_argument("--base-url", metavar="URL", help="an OpenAI-compatible server to drive instead of llmos instances "
                   "(e.g. http://127.0.0.1:8080): no instance, no baselines, always streaming")
    p.add_argument("--model", help="with --base-url: the requests' model; None: the first id of GET /v1/models")
    p.add_argument("--api-key", help="with --base-url: sent as a bearer token; None: $OPENAI_API_KEY if set")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.requests = ns.requests or 4 * ns.workers
        ns.output_len = "uniform:16:64" if ns.output_len == p.get_default("output_len") else ns.output_len
        ns.naive_requests = min(ns.naive_requests, 16)
        ns.reps = 1 if ns.reps == p.get_default("reps") else ns.reps
    ns.requests = ns.requests or 16 * ns.workers
    ns.policies = [x.strip() for x in ns.policies.split(",") if x.strip()]
    return ns


def check(ns: argparse.Namespace) -> str:
    """What is wrong with the options, or ""."""
    if ns.base_url and (ns.http or ns.plot):
        return "--base-url drives an external server: --http and --plot are for llmos instances"
    if ns.base_url and not ns.base_url.startswith(("http://", "https://")):
        return f"--base-url {ns.base_url!r}: expected http://HOST:PORT"
    bad = [x for x in ns.policies if x not in POLICIES]
    if bad or not ns.policies:
        return f"--policies: {', '.join(bad) or 'none given'}; choose from {', '.join(POLICIES)}"
    if min(ns.workers, ns.requests, ns.runners, ns.reps, ns.threads) < 1 or ns.naive_requests < 0 or ns.sample_interval <= 0:
        return "--workers, --requests, --runners, --threads and --reps must be >= 1, --naive-requests >= 0"
    return ""


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A rich progress bar on stderr (off when stderr is not a terminal). Yields
    `task(description, total)`, which returns `update(completed)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not console.is_terminal) as progress:
        def task(description: str, total: int) -> Callable[[int], None]:
            task_id = progress.add_task(description, total=total)
            return lambda done: progress.update(task_id, completed=done)

        yield task


@contextmanager
def interrupted_by_sigterm() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so the instances started are stopped."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def workload(ns: argparse.Namespace, context: int) -> list[WorkItem]:
    """The seeded requests, drawn with the shipped model's tokenizer for its `context`."""
    from llmos.libllm.tokenizer import load_tokenizer
    from llmos.servers.runner.loaders import default_tokenizer_path

    spec = Spec(ns.requests, ns.seed, parse_dist(ns.prompt_len), parse_dist(ns.output_len),
                parse_priorities(ns.priorities), ns.shared_prefix, ns.num_prefixes, ns.prefix_len, ns.temperature,
                ns.rate, context)
    return make_workload(spec, load_tokenizer(default_tokenizer_path()).encode)


def _config(ns: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(ns).items() if k not in ("json", "plot", "instance_prefix", "api_key")}


def run_base_url(ns: argparse.Namespace) -> dict[str, Any]:
    """The workload against the server at --base-url, as its JSON report (serve_openai)."""
    from llmos.bench.serve_openai import api_root, external_report, first_model, run_external
    from llmos.servers.runner.loaders import default_model_path, read_config

    url = api_root(ns.base_url)
    key = ns.api_key or os.environ.get("OPENAI_API_KEY", "")  # read here, so --help never shows it
    model = ns.model or first_model(url, key)
    items = workload(ns, read_config(default_model_path()).seq_len)
    with progress_bar() as task:
        records, duration = run_external(url, model, key, items, ns.workers, ns.rate > 0, task(url, len(items)))
    config = _config(ns) | {"open_loop": ns.rate > 0, "base_url": url, "model": model}
    return external_report(config, describe(items), records, duration)


def run(ns: argparse.Namespace) -> dict[str, Any]:
    """Everything the benchmark measures, as the JSON report (serve_results)."""
    from llmos.bench.serve_baselines import in_process, run_naive, stop_ids_of
    from llmos.bench.serve_results import build
    from llmos.bench.serve_system import RunOptions, SystemRun, run_system
    from llmos.servers.runner.model import Model

    model = Model.load()
    items = workload(ns, model.config.seq_len)
    stop_ids = stop_ids_of(model)
    options = RunOptions(ns.workers, ns.runners, ns.pages, ns.http, ns.stream, ns.rate > 0, ns.sample_interval,
                         ns.threads)
    max_tokens = sum(i.max_tokens for i in items)
    in_proc = []
    runs: dict[str, list[SystemRun]] = {p: [] for p in ns.policies}
    naive = None
    with progress_bar() as task, tempfile.TemporaryDirectory(prefix="llmos-bench-") as runtime:
        os.chmod(runtime, 0o700)
        in_process(model, items[: ns.workers], ns.workers, stop_ids)  # warm-up: scratch, KV pages faulted in
        for rep in range(ns.reps):
            tag = f" ({rep + 1}/{ns.reps})" if ns.reps > 1 else ""
            in_proc.append(in_process(model, items, ns.workers, stop_ids, task(f"in-process{tag}", len(items))))
            for policy in ns.policies:
                name = f"{ns.instance_prefix}-{policy}-{rep}"
                runs[policy].append(run_system(policy, items, options, runtime, name,
                                               task(f"llmos {policy}{tag} (tokens)", max_tokens)))
            if rep == 0 and ns.naive_requests:
                subset = items[: ns.naive_requests]
                naive = run_naive(subset, ns.workers, ns.rate > 0, task("naive server", len(subset)))
    config = _config(ns) | {"open_loop": ns.rate > 0, "model": str(model.loaded.path), "context": model.config.seq_len}
    return build(config, describe(items), in_proc, runs, naive)


def main(argv: list[str]) -> int:
    ns = parse_args(argv)
    problem = check(ns)
    if not problem:
        try:
            parse_dist(ns.prompt_len), parse_dist(ns.output_len), parse_priorities(ns.priorities)
            if ns.plot:
                from llmos.bench.serve_plot import require

                require()
        except (WorkloadError, RuntimeError) as exc:
            problem = str(exc)
    if problem:
        print(f"llmos bench serve: {problem}", file=sys.stderr)
        return 2
    try:
        with interrupted_by_sigterm():
            report = run_base_url(ns) if ns.base_url else run(ns)
    except (WorkloadError, RuntimeError) as exc:
        print(f"llmos bench serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every instance, worker and temporary dir is gone by now
        print("llmos bench serve: interrupted", file=sys.stderr)
        return 130
    write_json(ns.json, report)
    if ns.base_url:
        print(render_external(report))
        return _failures(report)
    print(render(report, ns.verbose))
    if ns.plot:
        from llmos.bench.serve_plot import write_plots

        paths = write_plots(report, ns.plot)
        print("\nCharts: " + ", ".join(str(p) for p in paths))
    return 0


def _failures(report: dict[str, Any]) -> int:
    """1 with the reasons on stderr when any request failed (the figures do not hold then), else 0."""
    s = report["summary"]
    if not s["failed"]:
        return 0
    reasons = "; ".join(f"{n} x {message}" for message, n in list(report["errors"].items())[:3])
    print(f"llmos bench serve: {s['failed']} of {s['failed'] + s['completed']} requests to "
          f"{report['config']['base_url']} failed: {reasons}", file=sys.stderr)
    return 1
