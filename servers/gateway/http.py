"""The gateway's HTTP server: the app behind the guard, served by uvicorn on a socket bound
first (so a taken port is one line, not uvicorn's traceback), and the event loop's lag
watched. Shared by the gateway process (__main__.py) and a cluster's front door
(llmos/cluster/front.py)."""

from __future__ import annotations

import asyncio
import socket

import uvicorn
from fastapi import FastAPI

from llmos.servers.gateway.guard import Guard
from llmos.servers.gateway.metrics import Histogram
from llmos.servers.gateway.settings import GatewaySettings

LAG_PROBE_S = 0.1


def listen(config: GatewaySettings) -> socket.socket:
    """The listening socket (port 0: a free one). Raises OSError.

    Made with its protocol named (IPPROTO_TCP), not as socket.create_server makes it: asyncio
    turns Nagle's algorithm off (TCP_NODELAY) only on connections whose socket says TCP, and
    with Nagle on, a response's body waits for the client's delayed ACK of its headers: ~40 ms
    on every HTTP request."""
    family, kind, proto, _, address = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM,
                                                         proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(4096)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer:
    """`app` served on `listener` until `stop()`; `url` once `start()` returned."""

    def __init__(self, app: FastAPI, config: GatewaySettings, listener: socket.socket) -> None:
        self.app = app
        self.listener = listener
        self.server = uvicorn.Server(uvicorn.Config(Guard(app, config), host=config.host, port=config.port,
                                                    log_level="warning", lifespan="off", backlog=4096,
                                                    timeout_keep_alive=30))
        self.task: asyncio.Task[None] | None = None
        self._lag_watch: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> bool:
        """Serve; False when uvicorn ended before it was up."""
        self._lag_watch = asyncio.create_task(watch_loop_lag(self.app.state.metrics.loop_lag))
        self.task = asyncio.create_task(self.server.serve(sockets=[self.listener]))
        while not self.server.started:
            if self.task.done():
                return False
            await asyncio.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return True

    def stop(self) -> None:
        self.server.should_exit = True

    async def wait(self) -> None:
        """Until the server has ended (after `stop()`)."""
        assert self.task is not None
        await self.task
        if self._lag_watch is not None:
            self._lag_watch.cancel()


async def watch_loop_lag(lag: Histogram) -> None:
    """How late a timer fires is how long the loop was kept from running anything else."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + LAG_PROBE_S
        await asyncio.sleep(LAG_PROBE_S)
        lag.observe(max(0.0, loop.time() - due))
