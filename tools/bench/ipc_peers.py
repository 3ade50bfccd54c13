"""The transports `llmos bench ipc` compares, each as a client loop plus an echo or sink
child process. Our ring and the C floor run over a real arena; the others are the
stdlib and, when installed, pyzmq and faster-fifo. Benchmark code: not imported by servers."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llmos.bench import _cfloor
from llmos.microkernel import Arena, PeerGone, Ring, Timeout
from llmos.microkernel import layout as L

CTX = mp.get_context("fork")
WAIT = 60.0
PAYLOAD = b"x" * 64
SPIN_FOREVER_NS = 50_000_000  # "spin mode": still bounded, then it parks
_seq = iter(range(1 << 30))


@contextlib.contextmanager
def bench_arena(size: int = 8 << 20, regions: Any = None) -> Iterator[Arena]:
    with Arena.create(f"llmos.bench-{os.getpid()}-{next(_seq)}", size, regions) as arena:
        yield arena


# Producer and consumer on separate CPUs when the machine has two: otherwise the
# scheduler's wake-affine placement often stacks both on one core and the figures
# measure time-slicing, not the transport. Every transport is pinned the same way.
_ALLOWED = sorted(os.sched_getaffinity(0))  # read before the parent pins itself
PIN = {"enabled": len(_ALLOWED) >= 2}


def _cpus() -> tuple[int, int]:
    return _ALLOWED[0], _ALLOWED[-1]


@contextlib.contextmanager
def pinned_parent() -> Iterator[None]:
    before = os.sched_getaffinity(0)
    if PIN["enabled"]:
        os.sched_setaffinity(0, {_cpus()[0]})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _run_pinned(cpu: int, target: Callable[..., Any], *args: Any) -> None:
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})
    target(*args)


def spawn(target: Callable[..., Any], *args: Any) -> Any:
    """Start a benchmark child (on the second CPU when pinning)."""
    cpu = _cpus()[1] if PIN["enabled"] else -1
    proc = CTX.Process(target=_run_pinned, args=(cpu, target, *args))
    proc.start()
    return proc


def _join(proc: Any) -> None:
    proc.join(WAIT)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise RuntimeError("benchmark child did not finish")
    if proc.exitcode != 0:
        raise RuntimeError(f"benchmark child failed with exit code {proc.exitcode}")


# --- round trips: each returns the per-round-trip samples in ns -----------------------

def _ring_echo(name: str, req_off: int, rep_off: int, spin_ns: int) -> None:
    arena = Arena.attach(name)
    req = Ring.attach(arena, req_off, side="consumer", spin_ns=spin_ns)
    rep = Ring.attach(arena, rep_off, side="producer", spin_ns=spin_ns)
    with contextlib.suppress(PeerGone):
        while True:
            rep.send(req.recv(WAIT))
    rep.close()


def rt_ring(rounds: int, spin_ns: int) -> np.ndarray[Any, Any]:
    with bench_arena() as arena:
        req = Ring.create(arena, 4096, side="producer", spin_ns=spin_ns)
        rep = Ring.create(arena, 4096, side="consumer", spin_ns=spin_ns)
        child = spawn(_ring_echo, arena.name, req.offset, rep.offset, spin_ns)
        samples = np.empty(rounds, dtype=np.int64)
        clock = time.perf_counter_ns
        send, recv = req.send, rep.recv
        for i in range(rounds):
            t0 = clock()
            send(PAYLOAD)
            recv(WAIT)
            samples[i] = clock() - t0
        req.close()
        _join(child)
        rep.close()
    return samples


def rt_ring_spin(rounds: int) -> np.ndarray[Any, Any]:
    return rt_ring(rounds, SPIN_FOREVER_NS)


def rt_ring_parked(rounds: int) -> np.ndarray[Any, Any]:
    return rt_ring(rounds, 0)


def _floor(rounds: int, parked: bool) -> np.ndarray[Any, Any]:
    with bench_arena(1 << 20) as arena:
        word = arena.carve(L.RegionKind.RINGS, 64)
        child = spawn(_cfloor.serve, arena.buf, word, rounds, parked)
        samples = _cfloor.ping(arena.buf, word, rounds, parked)
        _join(child)
    return samples


def rt_c_futex(rounds: int) -> np.ndarray[Any, Any]:
    return _floor(rounds, True)


def rt_c_spin(rounds: int) -> np.ndarray[Any, Any]:
    return _floor(rounds, False)


def _queue_echo(inq: Any, outq: Any, rounds: int) -> None:
    for _ in range(rounds):
        outq.put(inq.get())


def rt_mp_queue(rounds: int) -> np.ndarray[Any, Any]:
    inq, outq = CTX.Queue(), CTX.Queue()
    child = spawn(_queue_echo, inq, outq, rounds)
    samples = _loop(rounds, inq.put, outq.get)
    _join(child)
    return samples


def _pipe_echo(conn: Any, rounds: int) -> None:
    for _ in range(rounds):
        conn.send_bytes(conn.recv_bytes())


def rt_mp_pipe(rounds: int) -> np.ndarray[Any, Any]:
    ours, theirs = CTX.Pipe()
    child = spawn(_pipe_echo, theirs, rounds)
    samples = _loop(rounds, ours.send_bytes, ours.recv_bytes)
    _join(child)
    return samples


def _mq_echo(names: tuple[str, str], rounds: int) -> None:
    import posix_ipc

    inq, outq = (posix_ipc.MessageQueue(n) for n in names)
    for _ in range(rounds):
        outq.send(inq.receive()[0])
    inq.close()
    outq.close()


def rt_posix_mq(rounds: int) -> np.ndarray[Any, Any]:
    """The kernel's own message queue: a blocking receive woken by the sender (the yardstick
    for the ring's parked wake-up)."""
    import posix_ipc

    names = (f"/llmos-bench-{os.getpid()}-{next(_seq)}", f"/llmos-bench-{os.getpid()}-{next(_seq)}")
    queues = [posix_ipc.MessageQueue(n, posix_ipc.O_CREX, max_messages=8, max_message_size=len(PAYLOAD))
              for n in names]
    try:
        child = spawn(_mq_echo, names, rounds)
        samples = _loop(rounds, queues[0].send, lambda: queues[1].receive()[0])
        _join(child)
    finally:
        for q in queues:
            q.close()
            q.unlink()
    return samples


def _zmq_echo(address: str, rounds: int) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.connect(address)
    for _ in range(rounds):
        sock.send(sock.recv())
    sock.close(linger=0)
    ctx.term()


def rt_zmq(rounds: int) -> np.ndarray[Any, Any]:
    import zmq

    with tempfile.TemporaryDirectory() as tmp:
        address = f"ipc://{tmp}/echo.sock"
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.bind(address)
        child = spawn(_zmq_echo, address, rounds)
        samples = _loop(rounds, sock.send, sock.recv)
        _join(child)
        sock.close(linger=0)
        ctx.term()
    return samples


def _fifo_echo(inq: Any, outq: Any, rounds: int) -> None:
    for _ in range(rounds):
        outq.put(inq.get(timeout=WAIT))


def rt_faster_fifo(rounds: int) -> np.ndarray[Any, Any]:
    from faster_fifo import Queue

    inq, outq = Queue(1 << 20), Queue(1 << 20)
    child = spawn(_fifo_echo, inq, outq, rounds)
    samples = _loop(rounds, inq.put, lambda: outq.get(timeout=WAIT))
    _join(child)
    return samples


def _loop(rounds: int, send: Callable[[bytes], Any], recv: Callable[[], Any]) -> np.ndarray[Any, Any]:
    samples = np.empty(rounds, dtype=np.int64)
    clock = time.perf_counter_ns
    for i in range(rounds):
        t0 = clock()
        send(PAYLOAD)
        recv()
        samples[i] = clock() - t0
    return samples


def _start_ready(args: list[str], env: dict[str, str], ready: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(ready):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{args[1]} did not start: {line!r}")
    return proc


def rt_kernel_echo(rounds: int) -> np.ndarray[Any, Any]:
    """A full message round trip through kernel-made channels to the echo server process:
    header encode/decode, seq and latency accounting, the server loop's dispatch."""
    from llmos.microkernel.endpoint import Endpoint
    from llmos.microkernel.messages import MsgType

    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as runtime:
        instance = f"bench-{os.getpid()}-{next(_seq)}"
        env = {**os.environ, "LLMOS_RUNTIME_DIR": runtime}
        kernel = _start_ready(["-m", "llmos.microkernel.kernel", "--instance", instance, "--rings", "4M"], env,
                              "llmos kernel ready")
        echo = _start_ready(["-m", "llmos.servers.echo", "--instance", instance], env, "llmos echo ready")
        if PIN["enabled"]:
            os.sched_setaffinity(echo.pid, {_cpus()[1]})
        try:
            os.environ["LLMOS_RUNTIME_DIR"] = runtime
            with Endpoint.connect(instance) as endpoint:
                channel = endpoint.open_channel("echo")
                samples = _loop(rounds, lambda p: channel.call(MsgType.TEST_ECHO, p), lambda: None)
        finally:
            os.environ.pop("LLMOS_RUNTIME_DIR", None)
            for proc in (echo, kernel):
                proc.terminate()
                proc.wait(WAIT)
                assert proc.stdout is not None
                proc.stdout.close()
    return samples


def available_round_trips() -> dict[str, Callable[[int], np.ndarray[Any, Any]]]:
    found: dict[str, Callable[[int], np.ndarray[Any, Any]]] = {
        "ring spin": rt_ring_spin,
        "ring parked": rt_ring_parked,
        "kernel channel to echo server": rt_kernel_echo,
        "C spin (floor)": rt_c_spin,
        "C futex (floor)": rt_c_futex,
        "mp.Queue": rt_mp_queue,
        "mp.Pipe": rt_mp_pipe,
        "POSIX message queue": rt_posix_mq,
    }
    with contextlib.suppress(ImportError):
        import zmq  # noqa: F401

        found["pyzmq ipc"] = rt_zmq
    with contextlib.suppress(ImportError):
        import faster_fifo  # noqa: F401

        found["faster-fifo"] = rt_faster_fifo
    return found


# --- one-way throughput: records per second -------------------------------------------

def _ring_sink_producer(name: str, offset: int, count: int, batch: int) -> None:
    arena = Arena.attach(name)
    ring = Ring.attach(arena, offset, side="producer")
    if batch <= 1:
        send = ring.send
        for _ in range(count):
            send(PAYLOAD, None, False)
    else:
        chunk = [PAYLOAD] * batch
        for _ in range(count // batch):
            ring.send_many(chunk, WAIT, False)
    ring.close()


def oneway_ring(count: int, batch: int) -> float:
    """64-byte records/s from a producer process to this one (one call per record, or
    send_many/recv_many batches)."""
    with bench_arena() as arena:
        ring = Ring.create(arena, 1 << 16, side="consumer")
        child = spawn(_ring_sink_producer, arena.name, ring.offset, count, batch)
        got = 0
        ring.recv(WAIT)
        t0 = time.perf_counter_ns()
        got = 1
        if batch <= 1:
            recv = ring.recv
            with contextlib.suppress(PeerGone):
                while True:
                    recv(WAIT)
                    got += 1
        else:
            recv_many = ring.recv_many
            with contextlib.suppress(PeerGone):
                while True:
                    got += len(recv_many(4096, WAIT))
        elapsed = time.perf_counter_ns() - t0
        _join(child)
        ring.close()
    expected = count if batch <= 1 else count // batch * batch
    if got != expected:
        raise RuntimeError(f"one-way ring lost records: {got} of {expected}")
    return (got - 1) / (elapsed / 1e9)


def _queue_producer(q: Any, count: int) -> None:
    for _ in range(count):
        q.put(PAYLOAD)
    q.put(None)


def oneway_mp_queue(count: int) -> float:
    q = CTX.Queue()
    child = spawn(_queue_producer, q, count)
    q.get()
    t0 = time.perf_counter_ns()
    got = 1
    while q.get() is not None:
        got += 1
    elapsed = time.perf_counter_ns() - t0
    _join(child)
    return (got - 1) / (elapsed / 1e9)


# --- 1 MiB handoff: bytes per second ------------------------------------------------------

MIB = 1 << 20


def _arena_handoff_producer(name: str, req_off: int, credit_off: int, slots: list[int], count: int) -> None:
    arena = Arena.attach(name)
    req = Ring.attach(arena, req_off, side="producer")
    credit = Ring.attach(arena, credit_off, side="consumer")
    source = np.full(MIB, 7, dtype=np.uint8)
    for i in range(count):
        if i >= len(slots):
            credit.recv(WAIT)  # the consumer handed a slot back
        slot = slots[i % len(slots)]
        np.copyto(arena.ndarray(slot, (MIB,), np.uint8), source)
        req.send(slot.to_bytes(8, "little") + MIB.to_bytes(8, "little"))
    req.close()


def handoff_arena(count: int) -> float:
    """1 MiB per message by arena reference: producer copies in, consumer copies out."""
    regions = [(L.RegionKind.RINGS, 1 << 16), (L.RegionKind.SEGMENTS, 4 * MIB)]
    with bench_arena(8 << 20, regions) as arena:
        base = arena.region(L.RegionKind.SEGMENTS).offset
        slots = [base + i * MIB for i in range(4)]
        req = Ring.create(arena, 4096, side="consumer")
        credit = Ring.create(arena, 4096, side="producer")
        sink = np.empty(MIB, dtype=np.uint8)
        child = spawn(_arena_handoff_producer, arena.name, req.offset, credit.offset, slots, count)
        t0 = time.perf_counter_ns()
        for _ in range(count):
            ref = req.recv(WAIT)
            off, length = int.from_bytes(ref[:8], "little"), int.from_bytes(ref[8:], "little")
            np.copyto(sink, arena.ndarray(off, (length,), np.uint8))
            credit.send(b"k")
        elapsed = time.perf_counter_ns() - t0
        _join(child)
        req.close()
        credit.close()
    return count * MIB / (elapsed / 1e9)


def _queue_bulk_producer(q: Any, count: int) -> None:
    source = np.full(MIB, 7, dtype=np.uint8)
    for _ in range(count):
        q.put(source)


def handoff_mp_queue(count: int) -> float:
    q = CTX.Queue(maxsize=4)
    child = spawn(_queue_bulk_producer, q, count)
    t0 = time.perf_counter_ns()
    for _ in range(count):
        q.get()
    elapsed = time.perf_counter_ns() - t0
    _join(child)
    return count * MIB / (elapsed / 1e9)


# --- the CPU a parked consumer burns ------------------------------------------------------

def _parked_consumer(name: str, offset: int, seconds: float, out: Any) -> None:
    arena = Arena.attach(name)
    ring = Ring.attach(arena, offset, side="consumer")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with contextlib.suppress(Timeout):
        ring.recv(seconds)
    out.put((time.process_time() - cpu0) / (time.perf_counter() - wall0))


def parked_cpu_share(seconds: float) -> float:
    with bench_arena(1 << 20) as arena:
        ring = Ring.create(arena, 4096, side="producer")
        out = CTX.Queue()
        child = spawn(_parked_consumer, arena.name, ring.offset, seconds, out)
        share = float(out.get(timeout=WAIT + seconds))
        _join(child)
        ring.close()
    return share
