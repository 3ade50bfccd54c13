"""`python -m servers.gateway`: the HTTP gateway process (see servers/gateway/app.py).

Connects to the scheduler as a libllm client registered as "gateway" (its channel's window
is `max_in_flight`, so every request it admits can be at the scheduler at once), serves HTTP
with uvicorn behind the guard (keys, body limits), heartbeats to the kernel, watches its own
event loop's lag, and writes its URL to the run dir (`gateway.url`): port 0 picks a free
port, which is how tests run it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys

import uvicorn

from libllm import aio
from microkernel import instance as I
from microkernel.errors import PeerGone
from microkernel.lifeline import exit_with_supervisor
from servers.base import configure_logging
from servers.gateway.app import GatewayConfig, make_app
from servers.gateway.guard import Guard, GuardConfig
from servers.gateway.metrics import Histogram

HEARTBEAT_S = 0.5
LAG_PROBE_S = 0.1


async def watch_loop_lag(lag: Histogram) -> None:
    """How late a timer fires is how long the loop was kept from running anything else."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_PROBE_S
        await asyncio.sleep(LAG_PROBE_S)
        lag.observe(max(0.0, loop.time() - due))


async def serve(ns: argparse.Namespace) -> int:
    keys = json.loads(ns.api_keys)
    config = GatewayConfig(api_keys=keys, max_body_bytes=ns.max_body_bytes, max_tokens_cap=ns.max_tokens,
                           max_in_flight=ns.max_in_flight, body_timeout_s=ns.body_timeout)
    try:  # bound here, so a taken port is one line, not uvicorn's traceback
        listener = socket.create_server((ns.host, ns.port), backlog=4096)
    except OSError as exc:
        print(f"llmos error: cannot listen on {ns.host}:{ns.port}: {exc.strerror or exc}", flush=True)
        return 2
    async with aio.connect(ns.instance, name=ns.name, window=ns.max_in_flight) as session:
        app = make_app(session, config)
        guarded = Guard(app, GuardConfig(keys, ns.max_body_bytes, ns.body_timeout))
        lag_watch = asyncio.create_task(watch_loop_lag(app.state.metrics.loop_lag))
        server = uvicorn.Server(uvicorn.Config(guarded, host=ns.host, port=ns.port, log_level="warning",
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
    parser = argparse.ArgumentParser(prog="python -m servers.gateway")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--name", default="gateway")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-keys", default="{}", help='JSON {"key": "tenant"}; empty: no authentication')
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-tokens", type=int, default=512, help="cap on max_tokens per request")
    parser.add_argument("--max-in-flight", type=int, default=256, help="choices at the scheduler before 429")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take")
    ns = parser.parse_args(argv)
    configure_logging(ns.name)
    exit_with_supervisor()
    return asyncio.run(serve(ns))


if __name__ == "__main__":
    sys.exit(main())
