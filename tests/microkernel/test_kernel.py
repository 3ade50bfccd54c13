"""The kernel process through real processes: handshake, registry, channels, PEER_GONE,
SO_PEERCRED. Tests that kill nothing share one instance (a kernel and an echo server)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from llmos.microkernel import control as C
from llmos.microkernel.endpoint import Endpoint
from llmos.microkernel.errors import InvalidRequest, KernelUnavailable, PeerGone, Unsupported
from llmos.microkernel.messages import MsgType, decode, encode
from llmos.servers.echo.__main__ import EchoInfo
from tests.microkernel.procs import wait_until
from tests.processes import WAIT, Instance, start, stop


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    instance = Instance(tmp_path_factory.mktemp("run"))
    instance.start_kernel()
    instance.start_echo()
    yield instance
    instance.stop_all()
    assert not instance.run_dir.joinpath("kernel.sock").exists()
    assert not Path(f"/dev/shm/llmos.{instance.name}").exists()


@pytest.fixture
def endpoint(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> Iterator[Endpoint]:
    monkeypatch.setenv("LLMOS_RUNTIME_DIR", str(inst.runtime))
    with Endpoint.connect(inst.name) as ep:
        yield ep


def echo_info(ep: Endpoint, server: str = "echo") -> EchoInfo:
    ch = ep.open_channel(server)
    info: EchoInfo = msgspec.msgpack.decode(ch.call(MsgType.TEST_INFO).payload, type=EchoInfo)
    ep.drop_channel(ch.channel_id)
    return info


def test_handshake_registration_and_a_round_trip(endpoint: Endpoint) -> None:
    stats = endpoint.kernel_stats()
    names = {e.name for e in stats.endpoints}
    assert "echo" in names
    channel = endpoint.open_channel("echo")
    for size in (0, 1, 64, 4000):
        assert channel.call(MsgType.TEST_ECHO, b"z" * size).payload == b"z" * size
    rings = [r for r in endpoint.kernel_stats().rings if r.channel_id == channel.channel_id]
    assert {r.direction for r in rings} == {"request", "reply"}
    assert all(r.sent_records == r.recv_records == 4 and r.seq_gaps == 0 for r in rings)


def test_unknown_type_is_unsupported_and_errors_name_the_field(endpoint: Endpoint) -> None:
    channel = endpoint.open_channel("echo")
    with pytest.raises(Unsupported, match="0x7f55"):
        channel.call(0x7F55)
    assert channel.call(MsgType.TEST_ECHO, b"still up").payload == b"still up"


def test_connecting_to_a_missing_server_is_peer_gone(endpoint: Endpoint) -> None:
    with pytest.raises(PeerGone, match="no server named 'nobody'"):
        endpoint.open_channel("nobody")


def test_missing_kernel_says_how_to_start_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(KernelUnavailable, match="llmos up --instance nothere"):
        Endpoint.connect("nothere")


def test_a_taken_name_is_refused(inst: Instance) -> None:
    with pytest.raises(AssertionError, match="held by live pid"):
        start(["-m", "llmos.servers.echo", "--instance", inst.name, "--name", "echo"], "llmos echo ready",
              inst.log("echo-dup"), inst.env)


def test_wrong_protocol_version_is_refused_clearly(inst: Instance) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(WAIT)
    sock.connect(str(inst.run_dir / "kernel.sock"))
    sock.send(encode(MsgType.KERNEL_HELLO, C.pack(C.Hello(protocol=999, pid=os.getpid())), txid=5))
    header, body = decode(sock.recv(65536))
    sock.close()
    assert header.txid == 5 and header.status != 0
    assert "protocol version 999 is not supported" in C.unpack(body, C.ErrorReply).message


def test_connects_waiting_for_servers_are_bounded_and_go_with_their_client(inst: Instance, endpoint: Endpoint) -> None:
    """One endpoint may wait for 16 servers that have not registered; a 17th wait is refused,
    and every wait it had is forgotten when it leaves (the kernel keeps nothing of it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(WAIT)
    sock.connect(str(inst.run_dir / "kernel.sock"))
    sock.send(encode(MsgType.KERNEL_HELLO, C.pack(C.Hello(C.PROTOCOL_VERSION, os.getpid())), txid=1))
    assert decode(sock.recv(65536))[0].status == 0
    for i in range(17):
        sock.send(encode(MsgType.KERNEL_CONNECT, C.pack(C.Connect(f"nobody-yet-{i}", wait=True)), txid=2 + i))
    header, body = decode(sock.recv(65536))  # only the refusal answers: the others wait
    assert header.txid == 18 and "already waits for 16 servers to register" in C.unpack(body, C.ErrorReply).message
    assert endpoint.kernel_stats().connects_waiting == 16
    sock.close()
    wait_until(lambda: endpoint.kernel_stats().connects_waiting == 0, "the leaver's waits to be forgotten")


def test_garbage_on_the_kernel_socket_gets_an_error(inst: Instance, endpoint: Endpoint) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(WAIT)
    sock.connect(str(inst.run_dir / "kernel.sock"))
    for junk in (b"", b"\x00" * 10, encode(MsgType.KERNEL_CONNECT, b"\xc1"), encode(MsgType.KERNEL_HELLO, b"\x93\x01")):
        if junk:
            sock.send(junk)
            header, _ = decode(sock.recv(65536))
            assert header.status != 0
    sock.close()
    assert endpoint.kernel_stats().endpoints  # the kernel is still there


def _client_that_opens_a_channel(inst: Instance) -> subprocess.Popen[str]:
    code = (
        "from microkernel.endpoint import Endpoint\n"
        "from microkernel.messages import MsgType\n"
        f"ep = Endpoint.connect({inst.name!r})\n"
        "ch = ep.open_channel('echo')\n"
        "assert ch.call(MsgType.TEST_ECHO, b'x').payload == b'x'\n"
        "print('client ready', ch.channel_id, flush=True)\n"
        "import time\n"
        "time.sleep(3600)\n"
    )
    return start(["-c", code], "client ready", inst.log("client"), inst.env)


def test_kill_9_of_a_client_frees_its_rings_and_the_server_hears_peer_gone(inst: Instance, endpoint: Endpoint) -> None:
    before = echo_info(endpoint).num_peers_gone
    client = _client_that_opens_a_channel(inst)
    pids = {e.pid for e in endpoint.kernel_stats().endpoints}
    assert client.pid in pids
    stop(client, signal.SIGKILL)
    wait_until(lambda: client.pid not in {e.pid for e in endpoint.kernel_stats().endpoints}, "the kernel to retire it")
    wait_until(lambda: echo_info(endpoint).num_peers_gone > before, "the echo server to hear PEER_GONE")


def test_kill_9_of_the_server_ends_a_blocked_call_with_peer_gone(inst: Instance, endpoint: Endpoint) -> None:
    server = inst.start_echo("echo-doomed")
    channel = endpoint.open_channel("echo-doomed")
    txid = channel.request(MsgType.TEST_HOLD)
    wait_until(lambda: echo_info(endpoint, "echo-doomed").num_held == 1, "the server to hold the call")
    os.kill(server.pid, signal.SIGKILL)
    with pytest.raises(PeerGone):
        while True:  # the held call never gets a reply: the ring's closed producer ends the wait
            channel.complete(channel.receive(WAIT))
    assert txid in channel._in_flight
    stop(inst.procs.pop("echo-doomed"))
    # A restarted server takes its name back once the old connection has closed.
    inst.start_echo("echo-doomed")
    assert endpoint.open_channel("echo-doomed").call(MsgType.TEST_ECHO, b"back").payload == b"back"
    events = endpoint.poll_control()
    assert any(e.type == MsgType.KERNEL_PEER_GONE and e.body.name == "echo-doomed" for e in events)
    assert any(e.type == MsgType.KERNEL_REGISTER and e.body.name == "echo-doomed" for e in events)
    stop(inst.procs.pop("echo-doomed"))


def test_a_flood_of_malformed_records_gets_error_replies(endpoint: Endpoint) -> None:
    channel = endpoint.open_channel("echo")
    before = echo_info(endpoint).num_errors_replied
    bad_length = encode(MsgType.TEST_ECHO, b"abc")[:-1]  # length field says 3, record carries 2
    bad_flags = b"\x01\x7f\x00\x80" + encode(MsgType.TEST_ECHO)[4:]
    junk = [b"", b"short", b"\xff" * 48, bad_length, bad_flags]
    for i in range(200):
        channel.outgoing.send(junk[i % len(junk)])
    errors = 0
    while errors < 200:
        message = channel.receive(WAIT)
        assert message.header.status != 0
        errors += 1
    assert channel.call(MsgType.TEST_ECHO, b"alive").payload == b"alive"
    assert echo_info(endpoint).num_errors_replied >= before + 200


def test_a_client_that_never_reads_does_not_stall_another(inst: Instance, endpoint: Endpoint) -> None:
    greedy = endpoint.open_channel("echo")
    payload = b"p" * 4000
    sent = 0
    while greedy.outgoing.try_send(encode(MsgType.TEST_ECHO, payload, txid=sent + 1)):
        sent += 1
    # The server's replies to `greedy` fill its reply ring and then its backlog; it stops
    # reading greedy's requests, and still answers everyone else.
    with Endpoint.connect(inst.name) as other:
        polite = other.open_channel("echo")
        for _ in range(50):
            assert polite.call(MsgType.TEST_ECHO, b"me too").payload == b"me too"
    got = 0
    while got < sent:
        got += len(greedy.incoming.recv_many(1000, WAIT))
    assert got == sent


def _connect_as(uid: int, path: Path, packet: bytes) -> bytes:
    """Fork, drop to `uid`, connect to the kernel, send `packet` (if any), return its answer."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only os._exit
        status = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(WAIT)
            sock.connect(str(path))
            if packet:
                sock.send(packet)
            os.write(write_fd, sock.recv(65536))
            status = 0
        except BaseException as exc:
            os.write(write_fd, f"ERR {exc!r}".encode())
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as answer:
        data = answer.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return data


def _endpoint_connect_as(uid: int, runtime: Path, instance: str) -> str:
    """Fork, drop to `uid`, `Endpoint.connect` as any client would; the error it raised."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on, only os._exit
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.environ["LLMOS_RUNTIME_DIR"] = str(runtime)
            Endpoint.connect(instance, timeout=WAIT)
            os.write(write_fd, b"connected")
        except BaseException as exc:
            os.write(write_fd, f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as answer:
        data = answer.read()
    os.waitpid(pid, 0)
    return data.decode()


def test_another_uid_is_refused_by_the_kernel_itself() -> None:
    if os.getuid() != 0:
        pytest.skip("running a client as another uid needs root")
    nobody = 65534
    # Its own kernel, under /tmp: pytest's tmp dirs sit below a 0700 directory.
    runtime = Path(tempfile.mkdtemp(prefix="llmos-uid-", dir="/tmp"))
    inst = Instance(runtime)
    try:
        inst.start_kernel()
        sock_path = inst.run_dir / "kernel.sock"
        # Open the way (run dirs and socket) so the connect reaches the kernel's own check.
        for path, mode in ((runtime, 0o711), (inst.run_dir, 0o711), (sock_path, 0o666)):
            os.chmod(path, mode)
        # The kernel checks SO_PEERCRED when it accepts, before any message: just listen.
        header, body = decode(_connect_as(nobody, sock_path, b""))
        assert header.status != 0
        assert "refused: uid 65534" in C.unpack(body, C.ErrorReply).message
        # Through libllm's own connect: the kernel's reason, not a broken pipe.
        assert _endpoint_connect_as(nobody, runtime, inst.name).startswith(
            "InvalidRequest: refused: uid 65534 is not the instance owner")
        wait_until(lambda: "refused connection from uid 65534" in inst.log("kernel").read_text(),
                   "the kernel's log line")
    finally:
        inst.stop_all()
        shutil.rmtree(runtime)


def test_registering_a_taken_name_is_invalid(endpoint: Endpoint, inst: Instance) -> None:
    with pytest.raises(InvalidRequest, match="held by live pid"):
        Endpoint.connect(inst.name, name="echo")


def test_a_hung_server_shows_in_its_heartbeat_age(inst: Instance, endpoint: Endpoint) -> None:
    server = inst.start_echo("echo-hung")

    def age() -> float:
        return next(e.heartbeat_age_s for e in endpoint.kernel_stats().endpoints if e.name == "echo-hung")

    os.kill(server.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: age() > 2.0, "the stopped server's heartbeat to age")
    finally:
        os.kill(server.pid, signal.SIGCONT)
    wait_until(lambda: age() < 2.0, "the resumed server to heartbeat again")
    stop(inst.procs.pop("echo-hung"))


def test_retired_rings_are_reused_under_a_new_generation(inst: Instance, endpoint: Endpoint) -> None:
    def cycle() -> tuple[int, int]:
        gone_before = echo_info(endpoint).num_peers_gone
        with Endpoint.connect(inst.name) as client:
            channel = client.open_channel("echo")
            assert channel.call(MsgType.TEST_ECHO, b"x").payload == b"x"
            ring, generation = channel.info.request_ring, channel.info.request_generation
        # The echo server closes its ends when it hears PEER_GONE; then the rings are free.
        wait_until(lambda: echo_info(endpoint).num_peers_gone > gone_before, "the server to drop the channel")
        return ring, generation

    cycle()
    used = endpoint.kernel_stats().rings_bytes_used
    seen = [cycle() for _ in range(20)]
    assert endpoint.kernel_stats().rings_bytes_used == used  # no ring space leaked
    generations = [g for _, g in seen]
    assert len(set(generations)) == len(generations)  # a reused ring is never the old one
    assert len({r for r, _ in seen}) < len(seen)  # and rings were indeed reused
