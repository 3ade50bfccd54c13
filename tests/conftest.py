"""Fixtures every test shares: unique arena names, a fresh arena, the ring implementations,
and a leak check that nothing of ours is left in /dev/shm after any test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from llmos.microkernel import Arena, Ring
from llmos.microkernel.ring_ref import RefRing

# Tests never assert time: no hypothesis deadlines, and slow machines are not a failure.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("ci")

SHM_DIR = "/dev/shm"
_counter = itertools.count()


def llmos_shm_entries() -> set[str]:
    # Only names this test process made: a benchmark running beside the suite is not a leak.
    return {name for name in os.listdir(SHM_DIR) if name.startswith(f"llmos.test-{os.getpid()}-")}


def unique_name(tag: str = "t") -> str:
    """An arena name only this test process uses (the leak check looks for its prefix)."""
    return f"llmos.{unique_instance(tag)}"


def unique_instance(tag: str = "t") -> str:
    """An instance name only this test process uses; its arena is llmos.<name>."""
    return f"test-{os.getpid()}-{tag}-{next(_counter)}"


@pytest.fixture(scope="session", autouse=True)
def nothing_left_at_the_end() -> Iterator[None]:
    """After the whole suite: no arena and no process of any instance the tests made."""
    yield
    marker = f"test-{os.getpid()}-"
    left = sorted(n for n in os.listdir(SHM_DIR) if marker in n)
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and int(pid) != os.getpid():
            procs.append(f"{pid}: {cmd[:120]}")
    assert not left and not procs, f"left behind by the suite: {left} {procs}"


@pytest.fixture(autouse=True)
def no_shm_leaks() -> Iterator[None]:
    before = llmos_shm_entries()
    yield
    left = llmos_shm_entries() - before
    for name in left:  # clean up so one leak does not fail every later test
        os.unlink(os.path.join(SHM_DIR, name))
    assert not left, f"test left shared memory behind: {sorted(left)}"


@pytest.fixture
def arena_name() -> str:
    return unique_name("arena")


@pytest.fixture
def arena(arena_name: str) -> Iterator[Arena]:
    with Arena.create(arena_name, 4 << 20) as a:
        yield a


@pytest.fixture(params=[Ring, RefRing], ids=["cython", "ref"])
def ring_impl(request: pytest.FixtureRequest) -> Any:
    return request.param
