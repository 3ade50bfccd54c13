"""`python -m llmos.servers.gateway`: the HTTP gateway process (see servers/gateway/app.py).

Connects to the scheduler as a libllm client registered as "gateway" (its channel's window
is `max_in_flight`, so every request it admits can be at the scheduler at once), serves HTTP
with uvicorn behind the guard (keys, body limits), heartbeats to the kernel, watches its own
event loop's lag, and writes its URL to the run dir (`gateway.url`): port 0 picks a free
port, which is how tests run it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from llmos.libllm import aio
from llmos.microkernel import instance as I
from llmos.microkernel.errors import PeerGone
from llmos.microkernel.lifeline import exit_with_supervisor
from llmos.servers.base import configure_logging
from llmos.servers.gateway.app import make_app
from llmos.servers.gateway.http import HttpServer, listen
from llmos.servers.gateway.settings import GatewaySettings
from llmos.servers.settings import ConfigError, add_settings_argument, decode_settings

HEARTBEAT_S = 0.5


async def serve(ns: argparse.Namespace, config: GatewaySettings) -> int:
    try:
        listener = listen(config)
    except OSError as exc:
        print(f"llmos error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", flush=True)
        return 2
    async with aio.connect(ns.instance, name=ns.name, window=config.max_in_flight) as session:
        http = HttpServer(make_app(session, config), config, listener)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, http.stop)
        if not await http.start():
            return 1
        (I.run_dir(session.session.instance) / "gateway.url").write_text(http.url + "\n")
        print(f"llmos {ns.name} ready {http.url}", flush=True)
        assert http.task is not None
        while not http.task.done():  # the supervisor's watchdog listens for these
            try:
                session.session.heartbeat()
            except PeerGone:
                http.stop()  # no kernel, no instance to serve
                break
            await asyncio.wait({http.task}, timeout=HEARTBEAT_S)
        await http.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmos.servers.gateway")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--name", default="gateway")
    add_settings_argument(parser, GatewaySettings)
    ns = parser.parse_args(argv)
    try:
        config = decode_settings(ns.settings, GatewaySettings)
    except ConfigError as exc:
        parser.error(str(exc))
    configure_logging(ns.name)
    exit_with_supervisor()
    return asyncio.run(serve(ns, config))


if __name__ == "__main__":
    sys.exit(main())
