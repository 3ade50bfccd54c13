"""The kernel's reuse of ring-region blocks (pure: a fake bump carver over a small region)."""

from __future__ import annotations

import pytest

from llmos.microkernel.errors import ArenaError
from llmos.microkernel.ring_space import RingSpace


class Bump:
    def __init__(self, size: int) -> None:
        self.size, self.used = size, 0

    def carve(self, n: int) -> int:
        if self.used + n > self.size:
            raise ArenaError("full")
        self.used += n
        return self.used - n

    def left(self) -> int:
        return self.size - self.used


def test_freed_blocks_are_reused_by_size_then_by_any_smaller_need() -> None:
    region = Bump(1000)
    space = RingSpace(region.carve, region.left)
    big = [space.take(300) for _ in range(3)]
    assert space.available() == 100
    with pytest.raises(ArenaError):
        space.take(200)
    space.give(big[1])
    assert space.take(300) == big[1]  # the same size first
    space.give(big[1])
    small = space.take(200)  # nothing left to carve: the larger free block serves
    assert small == big[1] and space.available() == 100
    space.give(small)  # back to its own size: a 300 fits it again
    assert space.available() == 400 and space.take(300) == big[1]


def test_a_region_carved_to_the_end_is_given_back_whole() -> None:
    region = Bump(64 * 10)
    space = RingSpace(region.carve, region.left)
    blocks = [space.take(64) for _ in range(10)]
    for b in blocks:
        space.give(b)
    assert space.available() == 640
    assert sorted(space.take(64) for _ in range(10)) == sorted(blocks)
