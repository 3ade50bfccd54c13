"""`python -m llmos.servers.scheduler`: the scheduler process (see servers/scheduler/server.py)."""

from __future__ import annotations

import argparse
import sys

from llmos.servers.base import configure_logging, connect
from llmos.servers.scheduler.server import SchedulerServer
from llmos.servers.scheduler.settings import SchedulerSettings
from llmos.servers.settings import ConfigError, add_settings_argument, decode_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmos.servers.scheduler")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--name", default="scheduler")
    parser.add_argument("--runners", required=True, help="comma-separated runner names")
    parser.add_argument("--quota-blocks", type=int, default=0,
                        help="KV blocks the requests of one tenant may hold at once (0: unlimited)")
    add_settings_argument(parser, SchedulerSettings)
    ns = parser.parse_args(argv)
    try:
        settings = decode_settings(ns.settings, SchedulerSettings)
    except ConfigError as exc:
        parser.error(str(exc))
    configure_logging(ns.name)
    server = SchedulerServer(connect(ns.instance, ns.name), settings, runners=[r for r in ns.runners.split(",") if r],
                             max_blocks_per_client=ns.quota_blocks or None)
    server.install_signal_handlers()
    print(f"llmos {ns.name} ready endpoint {server.endpoint.endpoint_id}", flush=True)
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
