"""FrontDoor: the Ray actor that serves the cluster's HTTP API, one URL for every node.

The gateway's routes (servers/gateway/app.py: OpenAI's completions and chat, plain and
streamed, the API keys, the limits) over libllm.cluster_aio: each request routed to a
node's instance (prefix affinity under a load bound, each tenant spread evenly), its tokens
back in batches, resubmitted with them on another node when its own dies. The tenant an API
key names reaches the node's scheduler (its actor registers as a peer trusted to name
one), so fair share and quotas hold per tenant on every node. `llmos cluster up` places it
on the node it runs on (softly: if that node goes, Ray places it on another); the manager
does not watch it, Ray restarts it (max_restarts).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import msgspec
import ray

from llmos.libllm.cluster import ClusterSession
from llmos.libllm.cluster_aio import AsyncClusterSession
from llmos.servers.gateway.app import make_app
from llmos.servers.gateway.http import HttpServer, listen
from llmos.servers.gateway.settings import GatewaySettings

START_TIMEOUT_S = 180.0  # the first instance must answer (ClusterSession waits for one)
STOP_TIMEOUT_S = 10.0


class FrontDoor:
    def __init__(self, gateway: dict[str, Any]) -> None:
        self.requested = gateway
        self.config = msgspec.convert(gateway, GatewaySettings)
        self.url = ""
        self._error = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: HttpServer | None = None
        self._session: ClusterSession | None = None
        # Its own thread and loop: the actor's methods (info, stop) stay answerable meanwhile.
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="llmos-front", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise RuntimeError(f"the front door was not serving within {START_TIMEOUT_S:g} s")
        if self._error:
            raise RuntimeError(self._error)

    async def _serve(self) -> None:
        config = self.config
        try:
            listener = listen(config)
        except OSError as exc:
            self._error = f"the front door cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            self._ready.set()
            return
        loop = asyncio.get_running_loop()
        try:  # (the first probes block: off the loop)
            self._session = await loop.run_in_executor(None, ClusterSession)
            session = AsyncClusterSession(self._session)
        except Exception as exc:
            listener.close()
            self._error = f"the front door found no instance: {exc}"
            self._ready.set()
            return
        http = HttpServer(make_app(session, config), config, listener)
        if not await http.start():
            listener.close()
            self._error = "the front door's HTTP server ended as it started"
            self._ready.set()
            return
        wildcard = config.host in ("0.0.0.0", "::")  # then the URL names the node: what others can reach
        host = ray.util.get_node_ip_address() if wildcard else config.host  # type: ignore[no-untyped-call]
        self.url = f"http://{host}:{http.url.rsplit(':', 1)[1]}"
        self._loop, self._http = loop, http
        self._ready.set()
        await http.wait()
        await session.close()

    def info(self) -> dict[str, Any]:
        """Its URL, where it runs, the instances it routes to now and those it never uses (why)."""
        session = self._session
        return {"url": self.url, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "instances": session.instances() if session is not None else [],
                "refused": session.refused_instances() if session is not None else {}}

    def same_config(self, gateway: dict[str, Any]) -> bool:
        return gateway == self.requested

    def stop(self) -> None:
        """Stop serving (`llmos cluster down`): open streams end, the port is freed."""
        if self._loop is not None and self._http is not None:
            self._loop.call_soon_threadsafe(self._http.stop)
        self._thread.join(STOP_TIMEOUT_S)
