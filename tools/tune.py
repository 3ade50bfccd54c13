"""`llmos tune [MODEL]`: measure what serves this model fastest on this machine, for a given
workload shape, and write the config that `llmos serve --config` takes.

Each candidate is a real instance (the same processes `llmos serve` starts, under a private
runtime dir) driven by `--concurrency` clients through libllm, closed loop, with prompts and
outputs of the given lengths; its figure is output tokens/s over the run, with TTFT beside it.
The knobs are searched one after another, each from the best so far: the layout (runners x
threads that fill the cores), the KV dtype, the scheduler's max batch size, then its decode
steps. A change is kept only when it beats the choice so far by more than --margin (the
machine is shared and noisy: a tie keeps the default). Runs in the user's shell.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from llmos.config import Config, ConfigError, load_config
from llmos.config_toml import config_toml

if TYPE_CHECKING:
    from llmos.bench.serve_workload import WorkItem


@dataclass(slots=True, frozen=True)
class Knobs:
    """One candidate: what tune varies."""

    runners: int
    threads: int
    kv_dtype: str
    max_batch_size: int
    decode_steps: int

    def label(self) -> str:
        return (f"{self.runners} x {self.threads}  kv {self.kv_dtype}  batch {self.max_batch_size:>3}  "
                f"steps {self.decode_steps:>2}")

    def apply(self, base: Config) -> Config:
        return replace(base, model=replace(base.model, runners=self.runners, threads=self.threads,
                                           kv_dtype=self.kv_dtype),
                       scheduler=replace(base.scheduler, max_batch_size=self.max_batch_size,
                                         decode_steps=self.decode_steps))


@dataclass(slots=True, frozen=True)
class Measured:
    knobs: Knobs
    tokens_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    requests: int
    wall_s: float


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="a GGUF or llama2.c file (default: [model] path of --config, else "
                   "the built-in model)")
    p.add_argument("--config", help="a config to start from (its other keys are kept in the output)")
    p.add_argument("--concurrency", type=int, default=32, help="clients sending at once (closed loop)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="output tokens per request (max_tokens)")
    p.add_argument("--requests", type=int, help="requests per candidate (default: enough for --run-s)")
    p.add_argument("--run-s", type=float, default=5.0,
                   help="seconds a candidate's run should last (sets the requests; at least 2 per client)")
    p.add_argument("--layouts", help="runners x threads to try, e.g. 1x2,2x1 (default: those that fill the cores)")
    p.add_argument("--kv-dtypes", default="f32,f16", help="KV dtypes to try")
    p.add_argument("--batch-sizes", help="max batch sizes to try (default: three up to the concurrency)")
    p.add_argument("--decode-steps", default="4,16,32", help="decode steps to try")
    p.add_argument("--margin", type=float, default=0.03, help="how much better a change must measure to be kept")
    p.add_argument("--out", default="llmos-tune.toml", help="where to write the chosen config")


def layouts(cores: int) -> list[tuple[int, int]]:
    """Every runners x threads that uses each core once, one runner first."""
    return [(cores // t, t) for t in range(cores, 0, -1) if cores % t == 0]


def batch_sizes(concurrency: int) -> list[int]:
    """Up to three max batch sizes: the concurrency and the powers of two below it."""
    sizes = [b for b in (8, 16, 32, 64, 128, 256) if b < concurrency] + [concurrency]
    return sizes[-3:]


def ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag}: expected numbers >= 1, got {text!r}")
    return values


def parse_layouts(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        r, sep, t = part.strip().partition("x")
        if not sep or not r.isdigit() or not t.isdigit() or int(r) < 1 or int(t) < 1:
            raise ConfigError(f"--layouts: expected RUNNERSxTHREADS, e.g. 2x1; got {part!r}")
        out.append((int(r), int(t)))
    return out


def search_space(ns: argparse.Namespace) -> tuple[list[tuple[int, int]], list[str], list[int], list[int]]:
    if min(ns.concurrency, ns.prompt_len, ns.output_len) < 1 or (ns.requests is not None and ns.requests < 1):
        raise ConfigError("--concurrency, --prompt-len, --output-len and --requests must be >= 1")
    if not 0 < ns.run_s <= 3600:
        raise ConfigError("--run-s must be in (0, 3600]")
    if not 0 <= ns.margin < 1:
        raise ConfigError("--margin must be in [0, 1)")
    kv = [x.strip() for x in ns.kv_dtypes.split(",") if x.strip()]
    if not kv or any(x not in ("f32", "f16") for x in kv):
        raise ConfigError(f"--kv-dtypes: f32 and/or f16, got {ns.kv_dtypes!r}")
    return (parse_layouts(ns.layouts) if ns.layouts else layouts(os.cpu_count() or 1), kv,
            ints(ns.batch_sizes, "--batch-sizes") if ns.batch_sizes else batch_sizes(ns.concurrency),
            ints(ns.decode_steps, "--decode-steps"))


def measure(knobs: Knobs, base: Config, items: list[WorkItem], concurrency: int, runtime: str, name: str,
            progress: Callable[[int], None]) -> Measured:
    """The workload's figures on an instance of `base` with `knobs` (`progress(tokens made)`)."""
    from llmos.bench.serve_metrics import summary
    from llmos.bench.serve_system import RunOptions, run_system

    done = run_system(knobs.label(), items, RunOptions(workers=concurrency), runtime, name, progress,
                      config=config_toml(knobs.apply(base)))
    ttft = summary(r.ttft_s for r in done.records) or {"p50": 0.0, "p99": 0.0}
    return Measured(knobs, sum(r.output_tokens for r in done.records) / done.wall_s, ttft["p50"], ttft["p99"],
                    len(done.records), done.wall_s)


def tokens(items: list[WorkItem]) -> int:
    return sum(item.max_tokens for item in items)


def context_of(config: Config, ns: argparse.Namespace) -> int:
    """Positions a sequence may hold; raises when the workload's requests do not fit."""
    from llmos.servers.runner.loaders import read_config

    context = min(x for x in (read_config(config.model.model_path()).seq_len, config.model.context) if x)
    if ns.prompt_len + ns.output_len > context:
        raise ConfigError(f"--prompt-len + --output-len is {ns.prompt_len + ns.output_len}; the model holds "
                          f"{context} positions")
    return context


def workload(ns: argparse.Namespace, config: Config, requests: int) -> list[WorkItem]:
    from llmos.bench.serve_workload import Dist, Spec, make_workload
    from llmos.libllm.tokenizer import load_tokenizer
    from llmos.servers.runner.loaders import tokenizer_path_for

    spec = Spec(requests, 0, Dist("fixed", ns.prompt_len, ns.prompt_len),
                Dist("fixed", ns.output_len, ns.output_len), None, 0.0, context=context_of(config, ns))
    return make_workload(spec, load_tokenizer(tokenizer_path_for(config.model.model_path())).encode)


def tune(ns: argparse.Namespace, base: Config) -> tuple[Knobs, list[Measured]]:
    """The coordinate search (module docstring); returns the choice and every measurement."""
    from llmos.bench.serve import progress_bar

    space_layouts, kv_dtypes, sizes, steps = search_space(ns)
    runners, threads = base.model.layout()
    best = Knobs(runners, threads, base.model.kv_dtype, base.scheduler.max_batch_size, base.scheduler.decode_steps)
    seen: dict[Knobs, Measured] = {}
    measured: list[Measured] = []
    with progress_bar() as task, tempfile.TemporaryDirectory(prefix="llmos-tune-") as runtime:
        os.chmod(runtime, 0o700)
        prefix = f"tune-{os.getpid()}"
        items = workload(ns, base, ns.requests or 2 * ns.concurrency)
        if ns.requests is None:
            # A first run of the defaults sets how many requests last --run-s (it also warms
            # the page cache, so the first candidate is not the only one to read the file).
            first = measure(best, base, items, ns.concurrency, runtime, f"{prefix}-calibrate",
                            task("calibrating", tokens(items)))
            per_s = first.requests / first.wall_s
            rounds = max(2, min(100, math.ceil(per_s * ns.run_s / ns.concurrency)))
            items = workload(ns, base, rounds * ns.concurrency)

        def run(knobs: Knobs) -> Measured:
            if knobs not in seen:
                seen[knobs] = measure(knobs, base, items, ns.concurrency, runtime, f"{prefix}-{len(seen)}",
                                      task(knobs.label(), tokens(items)))
                measured.append(seen[knobs])
            return seen[knobs]

        axes: list[Callable[[Knobs], list[Knobs]]] = [
            lambda k: [replace(k, runners=r, threads=t) for r, t in space_layouts],
            lambda k: [replace(k, kv_dtype=x) for x in kv_dtypes],
            lambda k: [replace(k, max_batch_size=b) for b in sizes],
            lambda k: [replace(k, decode_steps=s) for s in steps]]
        for axis in axes:
            current = run(best)
            for knobs in axis(best):
                result = run(knobs)
                if result.tokens_per_s > current.tokens_per_s * (1 + ns.margin):
                    best, current = knobs, result
    return best, measured


def table(measured: list[Measured], chosen: Knobs) -> str:
    lines = [f"{'runners x threads, kv, batch, steps':<44} {'tokens/s':>9} {'TTFT p50':>9} {'p99':>8}"]
    for m in measured:
        mark = "  <- chosen" if m.knobs == chosen else ""
        lines.append(f"{m.knobs.label():<44} {m.tokens_per_s:>9.1f} {m.ttft_p50_s * 1e3:>7.0f}ms "
                     f"{m.ttft_p99_s * 1e3:>6.0f}ms{mark}")
    return "\n".join(lines)


def main(ns: argparse.Namespace) -> int:
    from llmos.lifecycle import check_before_start

    try:
        base = load_config(ns.config)
        if ns.model is not None:
            base = replace(base, model=replace(base.model, path=str(Path(ns.model).expanduser().resolve())))
        if base.servers:
            raise ConfigError("llmos tune lays out the runners itself: drop the config's [[servers]]")
        # The measured instances listen on a free port each; the written config keeps yours.
        check_before_start(replace(base, gateway=replace(base.gateway, port=0)))
        search_space(ns)
        context_of(base, ns)
    except (ConfigError, ValueError, OSError) as exc:
        print(f"llmos tune: {exc}", file=sys.stderr)
        return 2
    measuring = replace(base, gateway=replace(base.gateway, port=0))
    try:
        chosen, measured = tune(ns, measuring)
    except ConfigError as exc:
        print(f"llmos tune: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # an instance that did not start, a client that failed
        print(f"llmos tune: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmos tune: interrupted", file=sys.stderr)
        return 130
    report = table(measured, chosen)
    print(report)
    workload = (f"{ns.concurrency} clients, prompts of {ns.prompt_len} tokens, outputs of {ns.output_len}, "
                f"{measured[0].requests} requests per run")
    head = "".join(f"# {line}".rstrip() + "\n" for line in [
        f"Written by `llmos tune` on {time.strftime('%Y-%m-%d %H:%M')} for {base.model.model_path()}",
        f"on {os.cpu_count()} cores; workload: {workload}.", "", *report.splitlines(), ""])
    Path(ns.out).write_text(head + config_toml(chosen.apply(base), changed_only=True))
    print(f"\nchose {chosen.label()}; wrote {ns.out} (llmos serve --config {ns.out})")
    return 0
