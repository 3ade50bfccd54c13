"""The ``llmos`` command.

Runs in the user's shell. Subcommands are thin: each parses its arguments and calls
into the module that does the work, so the work stays importable and testable.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import signal
import sys
from importlib.metadata import PackageNotFoundError, version

# `llmos bench NAME` runs tools/bench/NAME.py's main(argv) -> int.
BENCHMARKS = {
    "ipc": "llmos.bench.ipc",
    "model": "llmos.bench.model",
    "memory": "llmos.bench.memory",
    "e2e": "llmos.bench.e2e",
    "serve": "llmos.bench.serve",
    "cluster": "llmos.bench.cluster",
}


def package_version() -> str:
    try:
        return version("llmos")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmos", description="An operating system for LLM serving.")
    parser.add_argument("--version", action="version", version=f"llmos {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    from llmos import serve

    serve.add_arguments(commands.add_parser(
        "serve", help="serve a model over HTTP (OpenAI's API): one command, flags over the config",
        description="Start an instance serving MODEL over HTTP; prints its URL. Flags override --config."))
    from llmos import tune

    tune.add_arguments(commands.add_parser(
        "tune", help="measure which layout, KV dtype, batch size and decode steps serve a model fastest here",
        description="Short measured runs of real instances for a workload shape; prints the table and writes "
                    "the config it chose (llmos serve --config FILE)."))
    from llmos.cluster import commands as cluster

    cluster.add_arguments(commands.add_parser(
        "cluster", help="an instance on every node of a Ray cluster: up (serve's flags), down, status",
        description="Run llmos on an existing Ray cluster (pip install 'llmos[ray]'): one instance per node; "
                    "clients use libllm.cluster.connect()."))
    up = commands.add_parser("up", help="start an instance: the kernel, then the configured servers")
    up.add_argument("--config", help="TOML config (defaults built in)")
    up.add_argument("--instance", help="instance name (default: $LLMOS_INSTANCE or 'default')")
    up.add_argument("--detach", action="store_true", help="return once everything is ready")
    down = commands.add_parser("down", help="stop an instance and remove everything it made but its logs")
    down.add_argument("--instance")
    down.add_argument("--purge", action="store_true", help="remove its logs too")
    logs = commands.add_parser("logs", help="the instance's logs (kept after down): one process's or all")
    logs.add_argument("process", nargs="?", help="e.g. gateway, runner.0, kernel, supervisor (default: all)")
    logs.add_argument("--instance")
    logs.add_argument("-f", "--follow", action="store_true", help="go on printing what is written")
    logs.add_argument("-n", "--lines", type=int, default=50, help="last lines of each log (0: all)")
    status = commands.add_parser("status", help="processes, restarts, CPU, ring fill, arena use")
    status.add_argument("--instance")
    status.add_argument("--json", action="store_true", help="machine-readable")
    top = commands.add_parser("top", help="a live view of a running instance (one snapshot over a pipe)")
    top.add_argument("--instance")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    gen = commands.add_parser("generate", help="print the model's continuation of a prompt")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--priority", type=int, default=0)
    gen.add_argument("--stream", action="store_true", help="print pieces as they arrive")
    gen.add_argument("--instance")
    bench = commands.add_parser("bench", help="run a benchmark (llmos bench NAME --help)")
    bench.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        code = run(argv)
        sys.stdout.flush()  # here, not at exit, where a closed pipe could not be caught
        return code
    except BrokenPipeError:
        if not _stdout_has_no_reader():
            raise  # a pipe to some child broke, not ours: that is a real error
        # `llmos status | head`: the reader has gone. Say nothing more (stdout now goes
        # nowhere, so the flush at exit cannot fail again), with the shell's status for it.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def _stdout_has_no_reader() -> bool:
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return True  # stdout is closed or gone: nothing more to say on it either way


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "bench":
        module = importlib.import_module(BENCHMARKS[ns.name])
        return int(module.main(ns.args))
    if ns.command == "serve":
        from llmos import serve

        return serve.main(ns)
    if ns.command == "cluster":
        from llmos.cluster import commands as cluster

        return cluster.main(ns)
    if ns.command == "tune":
        from llmos import tune

        return tune.main(ns)
    from llmos import lifecycle

    if ns.command == "up":
        return lifecycle.up(ns.instance, ns.config, ns.detach)
    if ns.command == "down":
        return lifecycle.down(ns.instance, ns.purge)
    if ns.command == "logs":
        return lifecycle.logs(ns.instance, ns.process, ns.follow, ns.lines)
    if ns.command == "generate":
        return lifecycle.generate(ns)
    if ns.command == "top":
        from llmos import top

        return top.main(ns.instance, ns.interval)
    return lifecycle.status(ns.instance, ns.json)


if __name__ == "__main__":
    sys.exit(main())
