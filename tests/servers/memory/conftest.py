"""Arenas laid out for the memory server, closed and unlinked after each test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from llmos.microkernel import Arena
from llmos.servers.memory import (
    MemoryConfig,
    MemoryManager,
    QuotaConfig,
    arena_bytes,
    memory_regions,
)
from tests.conftest import unique_name

BLOCK_BYTES = 256
BLOCK_TOKENS = 4

MakeArena = Callable[..., Arena]
MakeMemory = Callable[..., MemoryManager]


@pytest.fixture
def make_arena() -> Iterator[MakeArena]:
    made: list[Arena] = []

    def make(
        num_blocks: int = 16,
        segment_bytes: int = 64 * 1024,
        max_segments: int | None = None,
        block_bytes: int = BLOCK_BYTES,
    ) -> Arena:
        regions = memory_regions(num_blocks * block_bytes, block_bytes, segment_bytes, max_segments)
        arena = Arena.create(unique_name("mem"), arena_bytes(regions), regions)
        made.append(arena)
        return arena

    yield make
    for arena in made:
        arena.close()
        arena.unlink()


@pytest.fixture
def make_memory(make_arena: MakeArena) -> MakeMemory:
    def make(
        num_blocks: int = 16,
        segment_bytes: int = 64 * 1024,
        quotas: QuotaConfig | None = None,
        max_segments: int | None = None,
    ) -> MemoryManager:
        arena = make_arena(num_blocks, segment_bytes, max_segments)
        config = MemoryConfig(
            BLOCK_BYTES, BLOCK_TOKENS, max_segments, quotas=quotas or QuotaConfig()
        )
        return MemoryManager.format(arena, config)

    return make


@pytest.fixture
def memory(make_memory: MakeMemory) -> MemoryManager:
    return make_memory()
