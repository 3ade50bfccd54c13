"""The ``llmos`` command.

Runs in the user's shell. Subcommands are thin: each parses its arguments and calls
into the module that does the work, so the work stays importable and testable.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

# `llmos bench NAME` runs tools/bench/NAME.py's main(argv) -> int.
BENCHMARKS = {
    "ipc": "tools.bench.ipc",
    "model": "tools.bench.model",
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
    bench = commands.add_parser("bench", help="run a benchmark (llmos bench NAME --help)")
    bench.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(BENCHMARKS[ns.name])  # the only command so far: bench
    return int(module.main(ns.args))


if __name__ == "__main__":
    sys.exit(main())
