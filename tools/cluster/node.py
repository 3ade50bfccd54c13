"""NodeInstance: the Ray actor that runs one node's llmos instance and serves its requests.

Runs on its node, in a Ray worker process. It brings the instance up the way `llmos up
--detach` does, owned by the actor (the supervisor stops the instance when the actor's
process ends, however it ends; the actor's restart waits for the old one to be down), then
holds one libllm connection to it (libllm.aio: an async actor, whose every request is a
coroutine woken when its replies are routed, as the gateway's are).
`run` takes a submit as bytes and streams the tokens back in batches (what came within
BATCH_S of the previous batch, the first token alone): one actor call per request and one
object per batch cross the network, never one per token. Arena, rings and runners stay on
the node; only token ids travel.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from llmos import lifecycle
from llmos.cleanup import read_state
from llmos.config import config_from_dict
from llmos.libllm import protocol as P
from llmos.libllm.aio import AsyncSession
from llmos.libllm.client import Session
from llmos.libllm.client import connect as connect_session
from llmos.libllm.request import Request
from llmos.microkernel.errors import LlmosError

BATCH_S = 0.05  # tokens made within this of the last batch travel together
CLIENT_NAME = "cluster"  # (server_key.TENANT_NAMERS)


def instance_name(prefix: str, node_id: str) -> str:
    """The node's instance: distinct per node, so nodes sharing a machine (a test cluster) can."""
    return f"{prefix}-{node_id[:12]}"


class NodeInstance:
    """One node's instance, and the way in for the cluster's clients (see libllm.cluster)."""

    def __init__(self, node_id: str, config: dict[str, Any], prefix: str) -> None:
        self.node_id = node_id
        self.instance = instance_name(prefix, node_id)
        self.config = config_from_dict(config, "llmos cluster")
        quiet = io.StringIO()
        key = secrets.token_hex(16)  # the instance's server key: so we may register as "cluster"
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            lifecycle.down(self.instance)  # a previous actor's instance (it crashed, or was killed)
            code = lifecycle.start(self.config, self.instance, True, ["--config-json", msgspec.json.encode(
                msgspec.to_builtins(self.config)).decode()], owner_pid=os.getpid(), key=key)
        if code != 0:
            raise RuntimeError(f"instance {self.instance!r} did not start on node {node_id}: {quiet.getvalue().strip()}")
        # As "cluster", the name the scheduler lets name tenants: the front door's tenants hold here.
        self.session: Session = connect_session(self.instance, name=CLIENT_NAME, key=key)
        self._aio: AsyncSession | None = None
        self.open: dict[str, Request] = {}  # requests running here, by the key their caller gave

    def _async(self) -> AsyncSession:
        """The connection for asyncio, made on the actor's event loop at its first use there."""
        if self._aio is None:
            self._aio = AsyncSession(self.session, asyncio.get_running_loop())
        return self._aio

    async def info(self) -> dict[str, Any]:
        """Who this is: node, instance, pid (of this actor), the model, the gateway's URL."""
        state = read_state(self.instance)
        return {"node_id": self.node_id, "instance": self.instance, "pid": os.getpid(),
                "model_info": msgspec.json.encode(self.session.info).decode(), "url": state.get("url"),
                "supervisor_pid": state.get("supervisor_pid")}

    async def stats(self) -> dict[str, Any]:
        """The scheduler's figures (steps, tokens, prefix cache hits), as `Session.stats`."""
        return await self._async().scheduler_stats()

    async def run(self, submit: bytes, key: str) -> AsyncIterator[tuple[int, list[int], bytes | None, str | None]]:
        """Generate for one submit (msgpack of P.Submit), named `key` for `cancel`: yields
        (offset of the first, token ids, Finished as msgpack or None, error or None) batches; the last has
        Finished or an error "Type: message". (The scheduler ends it at its timeout, if it has one.)"""
        aio = self._async()
        try:
            request = await aio.submit_prepared(P.unpack(submit, P.Submit))
        except (LlmosError, msgspec.ValidationError) as exc:
            yield 0, [], None, f"{type(exc).__name__}: {exc}"
            return
        pending = request.pending
        self.open[key] = request
        sent, last = 0, 0.0
        try:
            while pending.finished is None and pending.error is None:
                wait = last + BATCH_S - time.monotonic()
                if sent and wait > 0:
                    await asyncio.sleep(wait)  # let a batch gather: one object per batch, not per token
                await aio.news(request)
                pending.fresh.clear()
                batch = pending.token_ids[sent:]
                if batch and pending.finished is None and pending.error is None:
                    yield sent, batch, None, None
                    sent, last = sent + len(batch), time.monotonic()
            batch = pending.token_ids[sent:]
            if pending.error is not None:
                yield sent, batch, None, f"{type(pending.error).__name__}: {pending.error}"
            else:
                yield sent, batch, P.pack(pending.finished), None
        finally:
            self.open.pop(key, None)
            aio.cancel(request)  # the caller went (its generator was closed): it stops here too

    async def cancel(self, key: str) -> None:
        """Stop the request `run` was given `key` for (its end still comes, "cancelled")."""
        request = self.open.get(key)
        if request is not None:
            self._async().cancel(request)

    async def stop(self) -> int:
        """Take the instance down (`llmos cluster down`)."""
        if self._aio is not None:
            await self._aio.close()
        else:
            self.session.close()

        def down() -> int:
            with contextlib.redirect_stdout(io.StringIO()):
                return lifecycle.down(self.instance, purge=True)

        return await asyncio.get_running_loop().run_in_executor(None, down)
