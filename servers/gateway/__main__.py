"""`python -m servers.gateway`: the HTTP gateway process (see servers/gateway/app.py).

Connects to the scheduler as a libllm client registered as "gateway", serves HTTP with
uvicorn, heartbeats to the kernel, and writes its URL to the run dir (`gateway.url`):
port 0 picks a free port, which is how tests run it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import uvicorn

from libllm import aio
from microkernel import instance as I
from microkernel.errors import PeerGone
from microkernel.lifeline import exit_with_supervisor
from servers.base import configure_logging
from servers.gateway.app import GatewayConfig, make_app

HEARTBEAT_S = 0.5


async def serve(ns: argparse.Namespace) -> int:
    config = GatewayConfig(api_keys=json.loads(ns.api_keys), max_body_bytes=ns.max_body_bytes,
                           max_tokens_cap=ns.max_tokens, max_in_flight=ns.max_in_flight)
    async with aio.connect(ns.instance, name=ns.name) as session:
        app = make_app(session, config)
        server = uvicorn.Server(uvicorn.Config(app, host=ns.host, port=ns.port, log_level="warning",
                                               lifespan="off"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        task = asyncio.create_task(server.serve())
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
    parser.add_argument("--max-in-flight", type=int, default=256, help="requests at once before 429")
    ns = parser.parse_args(argv)
    configure_logging(ns.name)
    exit_with_supervisor()
    return asyncio.run(serve(ns))


if __name__ == "__main__":
    sys.exit(main())
