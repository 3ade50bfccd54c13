"""Shared tensors through real processes: `Session.alloc` in one process, `attach` in
another sees (and writes) the same bytes; free, close and kill -9 each give the memory
back; stale handles and bad shapes or dtypes are refused with the field named."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmos import libllm
from llmos.config import servers_toml
from llmos.libllm import protocol as P
from llmos.microkernel.endpoint import Endpoint
from tests.system.cli import running_instance
from tests.system.segments import Memory, used, wait_for_used

pytestmark = pytest.mark.slow
WAIT = 60.0
SEGMENT_REGION = 2 << 20
CONFIG = f"""
rings = "8M"
[memory]
pages = "2M"
segments = "{SEGMENT_REGION}"
""" + servers_toml(1)


@pytest.fixture(scope="module")
def instance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_instance(tmp_path_factory, CONFIG, "tensors") as name:
        yield name


@pytest.fixture(scope="module")
def memory(instance: str) -> Iterator[Memory]:
    with Endpoint.connect(instance) as endpoint:
        yield Memory(endpoint)


def attach_in_child(instance: str, handle: P.SegmentRef, shape: tuple[int, ...], dtype: str,
                    conn: Connection) -> None:
    """A second process: attach, report what it sees, write row 0, report done."""
    try:
        with libllm.connect(instance) as session:
            tensor = session.attach(handle, shape, dtype)
            conn.send(("seen", tensor.array.copy(), tensor.is_owner))
            tensor.array[0] = -1
            tensor.free()  # only forgets: the parent owns it
            conn.send(("done", None, None))
    except BaseException as exc:
        conn.send(("error", repr(exc), None))
        raise
    finally:
        conn.close()


def test_a_second_process_attaches_and_sees_the_same_bytes(instance: str, memory: Memory) -> None:
    before = used(memory)
    with libllm.connect(instance) as session:
        tensor = session.alloc((4, 8), np.float32)
        assert tensor.is_owner and tensor.shape == (4, 8) and tensor.dtype == np.float32 and tensor.nbytes == 128
        assert not tensor.array.any()  # zero-filled
        tensor.array[:] = np.arange(32, dtype=np.float32).reshape(4, 8)
        assert used(memory) >= before + 128
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=attach_in_child, args=(instance, tensor.handle, (4, 8), "float32", child))
        proc.start()
        child.close()
        try:
            assert parent.poll(WAIT), "the child said nothing"
            kind, seen, is_owner = parent.recv()
            assert kind == "seen", seen
            np.testing.assert_array_equal(seen, np.arange(32, dtype=np.float32).reshape(4, 8))
            assert is_owner is False
            assert parent.poll(WAIT)
            assert parent.recv()[0] == "done"
        finally:
            proc.join(WAIT)
            parent.close()
        assert proc.exitcode == 0
        np.testing.assert_array_equal(tensor.array[0], np.full(8, -1, np.float32))  # the child's write
        np.testing.assert_array_equal(tensor.array[1], np.arange(8, 16, dtype=np.float32))
        handle = (tensor.handle.segment_id, tensor.handle.generation)  # a plain pair does too
        view = session.attach(handle, (32,), np.float32)  # any shape and dtype within its bytes
        assert view.array[8] == 8.0
        view.free()
        assert used(memory) >= before + 128  # forgetting an attached view frees nothing
        tensor.free()
    assert used(memory) == before


def test_free_gives_the_memory_back_and_the_handle_goes_stale(instance: str, memory: Memory) -> None:
    with libllm.connect(instance) as session:
        before = used(memory)
        tensor = session.alloc(1000, "int64")
        array = tensor.array
        assert used(memory) >= before + 8000
        tensor.free()
        assert used(memory) == before
        assert tensor.freed
        with pytest.raises(libllm.Closed, match="freed"):
            _ = tensor.array
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 1  # the array it gave out no longer takes writes
        tensor.free()  # idempotent
        with pytest.raises(libllm.InvalidRequest, match="stale"):
            session.attach(tensor.handle, (1000,), "int64")
        with session.alloc((2, 2), np.uint8) as scoped:
            scoped.array[:] = 7
        assert scoped.freed and used(memory) == before


def test_closing_the_session_frees_what_it_allocated(instance: str, memory: Memory) -> None:
    before = used(memory)
    session = libllm.connect(instance)
    tensors = [session.alloc((64, 64), np.float32) for _ in range(3)]
    attached = session.attach(tensors[0].handle, (64,), np.float32)
    assert used(memory) >= before + 3 * 64 * 64 * 4
    session.close()
    assert used(memory) == before  # freed by close() itself, not later
    for tensor in [*tensors, attached]:
        with pytest.raises(libllm.Closed):
            _ = tensor.array
    with pytest.raises(libllm.Closed, match="closed"):  # the caller closed it: not PeerGone
        session.alloc(4)


def test_a_killed_process_gives_its_tensors_back(instance: str, memory: Memory) -> None:
    before = used(memory)
    code = (
        "import libllm, sys, time\n"
        f"session = libllm.connect({instance!r})\n"
        "tensor = session.alloc((256, 256), 'float32')\n"
        "tensor.array[:] = 1\n"
        "print('ready', flush=True)\n"
        "time.sleep(3600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        assert used(memory) >= before + 256 * 256 * 4
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(WAIT)
        assert proc.stdout is not None
        proc.stdout.close()
    wait_for_used(memory, before, "PEER_GONE to free the killed process's tensor")


BAD: list[tuple[Any, Any, str]] = [
    ((-1, 3), np.float32, "shape"),
    ((0,), np.float32, "shape"),
    ((4, 0, 2), np.float32, "shape"),
    ((2.5,), np.float32, "shape"),
    ((True,), np.float32, "shape"),
    ("4", np.float32, "shape"),
    ((SEGMENT_REGION // 4 + 1,), np.float32, "shape"),
    ((1 << 40, 1 << 40), np.float64, "shape"),
    ((4,), object, "dtype"),
    ((4,), "U10", "dtype"),
    ((4,), [("a", "i4"), ("b", "f8")], "dtype"),
    ((4,), "not a dtype", "dtype"),
]


@pytest.mark.parametrize(("shape", "dtype", "field"), BAD)
def test_bad_shapes_and_dtypes_are_refused_naming_the_field(instance: str, memory: Memory, shape: Any,
                                                            dtype: Any, field: str) -> None:
    before = used(memory)
    with libllm.connect(instance) as session:
        with pytest.raises(libllm.InvalidRequest, match=field):
            session.alloc(shape, dtype)
        with pytest.raises(libllm.InvalidRequest, match=field):
            session.attach((0, 1), shape, dtype)
    assert used(memory) == before


def test_attach_checks_the_handle_and_the_size(instance: str) -> None:
    with libllm.connect(instance) as session, session.alloc(16, np.float32) as tensor:
        with pytest.raises(libllm.InvalidRequest, match="shape"):
            session.attach(tensor.handle, (17,), np.float32)  # more bytes than it holds
        with pytest.raises(libllm.InvalidRequest, match="handle"):
            session.attach((10**6, 1), (4,), np.float32)
        with pytest.raises(libllm.InvalidRequest, match="handle"):
            session.attach("not a handle", (4,), np.float32)  # type: ignore[arg-type]
        assert session.attach(tensor.handle, (16,), np.float32).array.shape == (16,)


def test_out_of_space_says_what_to_do(instance: str, memory: Memory) -> None:
    before = used(memory)
    with libllm.connect(instance) as session:
        big = session.alloc(((SEGMENT_REGION - before) * 3 // 4,), np.uint8)
        with pytest.raises(libllm.Overloaded, match=r"(?s)no free extent.*[Ff]ree shared tensors.*segments"):
            session.alloc((SEGMENT_REGION // 2,), np.uint8)
        big.free()
        session.alloc((SEGMENT_REGION // 2,), np.uint8).free()  # room again
    assert used(memory) == before


def test_a_forked_child_attaches_instead_of_using_the_parents_mapping(instance: str, memory: Memory) -> None:
    with libllm.connect(instance) as session, session.alloc(8, np.int32) as tensor:
        tensor.array[:] = np.arange(8)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: only os._exit from here
            code = 1
            try:
                os.close(read_fd)
                try:
                    _ = tensor.array
                    report = "the parent's mapping was usable"
                except libllm.Closed as exc:
                    tensor.free()  # only forgets: the parent's segment stays
                    mine = session.attach(tensor.handle, (8,), np.int32)  # a connection of its own
                    mine.array[0] = 100
                    report = f"refused ({'attach' in str(exc)}) then {mine.array.tolist()}"
                os.write(write_fd, report.encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as child:
            got = child.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert got == "refused (True) then [100, 1, 2, 3, 4, 5, 6, 7]"
        assert tensor.array.tolist() == [100, 1, 2, 3, 4, 5, 6, 7]  # still the parent's, and shared
        assert not tensor.freed
