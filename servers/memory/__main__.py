"""`python -m llmos.servers.memory`: the memory server process (see servers/memory/server.py)."""

from __future__ import annotations

import argparse
import sys

from llmos.servers.base import configure_logging, connect
from llmos.servers.memory.manager import MemoryConfig
from llmos.servers.memory.quotas import ClientQuota, QuotaConfig
from llmos.servers.memory.server import MemoryServer
from llmos.servers.memory.settings import MemorySettings
from llmos.servers.settings import ConfigError, add_settings_argument, decode_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmos.servers.memory")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--name", default="memory")
    add_settings_argument(parser, MemorySettings)
    ns = parser.parse_args(argv)
    try:
        settings = decode_settings(ns.settings, MemorySettings)
        if settings.block_bytes <= 0 or settings.weights_bytes < 0:
            raise ConfigError("the memory server needs block_bytes and weights_bytes resolved for the model "
                              "(the supervisor does it)")
    except ConfigError as exc:
        parser.error(str(exc))
    configure_logging(ns.name)
    # 0 in the config means unlimited.
    quotas = QuotaConfig(default=ClientQuota(settings.quota_blocks or None, settings.quota_segment_bytes or None))
    config = MemoryConfig(settings.block_bytes, settings.block_tokens, quotas=quotas)
    server = MemoryServer(connect(ns.instance, ns.name), config, sweep_interval_s=settings.sweep_interval_s,
                          weights_bytes=settings.weights_bytes)
    server.install_signal_handlers()
    print(f"llmos {ns.name} ready endpoint {server.endpoint.endpoint_id}", flush=True)
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
