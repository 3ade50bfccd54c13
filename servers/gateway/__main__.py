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
import socket
import sys

import uvicorn

from llmos.libllm import aio
from llmos.microkernel import instance as I
from llmos.microkernel.errors import PeerGone
from llmos.microkernel.lifeline import exit_with_supervisor
from llmos.servers.base import configure_logging
from llmos.servers.gateway.app import make_app
from llmos.servers.gateway.guard import Guard
from llmos.servers.gateway.metrics import Histogram
from llmos.servers.gateway.settings import GatewaySettings
from llmos.servers.settings import ConfigError, add_settings_argument, decode_settings

HEARTBEAT_S = 0.5
LAG_PROBE_S = 0.1


async def watch_loop_lag(lag: Histogram) -> None:
    """How late a timer fires is how long the loop was kept from running anything else."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_PROBE_S
        await asyncio.sleep(LAG_PROBE_S)
        lag.observe(max(0.0, loop.time() - due))


async def serve(ns: argparse.Namespace, config: GatewaySettings) -> int:
    try:  # bound here, so a taken port is one line, not uvicorn's traceback
        listener = socket.create_server((config.host, config.port), backlog=4096)
    except OSError as exc:
        print(f"llmos error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", flush=True)
        return 2
    async with aio.connect(ns.instance, name=ns.name, window=config.max_in_flight) as session:
        app = make_app(session, config)
        guarded = Guard(app, config)
        lag_watch = asyncio.create_task(watch_loop_lag(app.state.metrics.loop_lag))
        server = uvicorn.Server(uvicorn.Config(guarded, host=config.host, port=config.port, log_level="warning",
                                               lifespan="off", backlog=4096, timeout_keep_alive=30))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        task = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started:
            if task.done():
                return 1
            await asyncio.sleep(0.01)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        url = f"http://{host}:{port}"
        (I.run_dir(session.session.instance) / "gateway.url").write_text(url + "\n")
        print(f"llmos {ns.name} ready {url}", flush=True)
        while not task.done():  # the supervisor's watchdog listens for these
            try:
                session.session.heartbeat()
            except PeerGone:
                server.should_exit = True  # no kernel, no instance to serve
                break
            await asyncio.wait({task}, timeout=HEARTBEAT_S)
        await task
        lag_watch.cancel()
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
