"""`python -m servers.runner`: a runner process (see servers/runner/server.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from servers.base import configure_logging
from servers.runner.loaders import default_model_path
from servers.runner.server import RunnerServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servers.runner")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--name", default="runner.0")
    parser.add_argument("--model", default=None, help="llama2.c .bin or .gguf (default: the built-in model)")
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="threads per step (same results for any count)")
    parser.add_argument("--context", type=int, default=0, help="positions a sequence may hold (0: the file's)")
    parser.add_argument("--kv-dtype", default="f32", choices=["f32", "f16"], help="what KV pages hold")
    ns = parser.parse_args(argv)
    configure_logging(ns.name)
    model = Path(ns.model) if ns.model else default_model_path()
    server = RunnerServer(ns.instance, model, block_tokens=ns.block_tokens, name=ns.name, threads=ns.threads,
                          context=ns.context or None, kv_dtype=ns.kv_dtype)
    server.install_signal_handlers()
    print(f"llmos {ns.name} ready endpoint {server.endpoint.endpoint_id}", flush=True)
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
