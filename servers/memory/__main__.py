"""`python -m servers.memory`: the memory server process (see servers/memory/server.py)."""

from __future__ import annotations

import argparse
import sys

from servers.base import configure_logging
from servers.memory.manager import MemoryConfig
from servers.memory.server import MemoryServer, quota_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m servers.memory")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--name", default="memory")
    parser.add_argument("--block-bytes", type=int, required=True, help="bytes of one KV block")
    parser.add_argument("--block-tokens", type=int, default=16, help="token slots per KV block")
    parser.add_argument("--quota-blocks", type=int, default=0, help="KV blocks per client (0: unlimited)")
    parser.add_argument("--quota-segment-bytes", type=int, default=0, help="segment bytes per client (0: unlimited)")
    parser.add_argument("--sweep-interval", type=float, default=5.0, help="seconds between sweeps")
    parser.add_argument("--weights-bytes", type=int, default=0, help="shared dequantised weights (owner 0)")
    ns = parser.parse_args(argv)
    configure_logging(ns.name)
    config = MemoryConfig(ns.block_bytes, ns.block_tokens, quotas=quota_config(ns.quota_blocks,
                                                                               ns.quota_segment_bytes))
    server = MemoryServer(ns.instance, config, sweep_interval_s=ns.sweep_interval, weights_bytes=ns.weights_bytes,
                          name=ns.name)
    server.install_signal_handlers()
    print(f"llmos {ns.name} ready endpoint {server.endpoint.endpoint_id}", flush=True)
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
