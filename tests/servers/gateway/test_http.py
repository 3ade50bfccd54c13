"""The gateway's listening socket: every connection it accepts has Nagle's algorithm off, so
a response's body never waits for the client's delayed ACK of its headers (that wait was
~40 ms on every HTTP request, /health included)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from llmos.servers.gateway.http import listen
from llmos.servers.gateway.settings import GatewaySettings


def test_accepted_connections_have_nagle_off() -> None:
    async def accept_one() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        listener = listen(GatewaySettings(port=0))
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        async with server:
            host, port = listener.getsockname()[:2]
            _, writer = await asyncio.open_connection(host, port)
            nodelay = await asyncio.wait_for(accepted, 10.0)
            writer.close()
            return nodelay

    assert asyncio.run(accept_one()) != 0


def test_a_taken_port_is_an_oserror_and_leaves_it_to_its_holder() -> None:
    holder = listen(GatewaySettings(port=0))
    try:
        port = holder.getsockname()[1]
        with pytest.raises(OSError):
            listen(GatewaySettings(port=port))
        assert holder.getsockname()[1] == port
    finally:
        holder.close()
