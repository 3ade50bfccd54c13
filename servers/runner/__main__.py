"""`python -m llmos.servers.runner`: a runner process (see servers/runner/server.py)."""

from __future__ import annotations

import argparse
import sys
from functools import partial

from llmos.servers.base import configure_logging, connect
from llmos.servers.runner.server import RunnerServer
from llmos.servers.runner.settings import ModelSettings
from llmos.servers.settings import ConfigError, add_settings_argument, decode_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmos.servers.runner")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--name", default="runner.0")
    parser.add_argument("--block-tokens", type=int, default=16, help="token slots per KV block ([memory])")
    add_settings_argument(parser, ModelSettings)
    ns = parser.parse_args(argv)
    try:
        settings = decode_settings(ns.settings, ModelSettings)
    except ConfigError as exc:
        parser.error(str(exc))
    configure_logging(ns.name)
    # Connected only once the model is loaded (RunnerServer): a factory, not an endpoint.
    server = RunnerServer(partial(connect, ns.instance, ns.name), settings.model_path(),
                          block_tokens=ns.block_tokens, threads=settings.threads or 1,
                          context=settings.context or None, kv_dtype=settings.kv_dtype)
    server.install_signal_handlers()
    print(f"llmos {ns.name} ready endpoint {server.endpoint.endpoint_id}", flush=True)
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
