"""The echo server: a real server process for tests and `llmos bench ipc` (round trips
through kernel-made channels). A test server, not a stand-in for any other server.

TEST_ECHO answers with the request's payload; TEST_HOLD never answers (a client blocked
on it sees PeerGone when this process dies); TEST_INFO reports the server's counters.
"""

from __future__ import annotations

import argparse
import sys

import msgspec

from llmos.microkernel.endpoint import Channel, Message
from llmos.microkernel.messages import MsgType
from llmos.servers.base import EndpointSource, Server, configure_logging, connect


class EchoInfo(msgspec.Struct, frozen=True):
    num_channels: int
    num_peers_gone: int
    num_errors_replied: int
    num_held: int


class EchoServer(Server):
    name = "echo"

    def __init__(self, endpoint: EndpointSource) -> None:
        super().__init__(endpoint, handlers={
            MsgType.TEST_ECHO: self.handle_echo,
            MsgType.TEST_HOLD: self.handle_hold,
            MsgType.TEST_INFO: self.handle_info,
        })
        self.num_held = 0

    def handle_echo(self, channel: Channel, message: Message) -> bytes:
        return message.payload

    def handle_hold(self, channel: Channel, message: Message) -> None:
        self.num_held += 1  # never answered: the client stays blocked until we die

    def handle_info(self, channel: Channel, message: Message) -> bytes:
        return msgspec.msgpack.encode(EchoInfo(
            len(self.endpoint.channels), self.num_peers_gone, self.num_errors_replied, self.num_held))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmos.servers.echo")
    parser.add_argument("--instance", default=None)
    parser.add_argument("--name", default="echo")
    ns = parser.parse_args(argv)
    configure_logging(ns.name)
    server = EchoServer(connect(ns.instance, ns.name))
    server.install_signal_handlers()
    print(f"llmos {ns.name} ready endpoint {server.endpoint.endpoint_id}", flush=True)
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
