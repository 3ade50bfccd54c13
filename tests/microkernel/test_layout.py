from __future__ import annotations

from llmos.microkernel import _ring
from llmos.microkernel import layout as L


def test_cython_structs_match_layout_module() -> None:
    offsets = _ring.header_offsets()
    assert offsets.pop("ring_header_size") <= L.RING_HEADER_SIZE
    assert offsets.pop("bell_size") == L.DOORBELL_SIZE
    for name, offset in offsets.items():
        assert getattr(L, name) == offset, name


def test_writer_groups_sit_on_separate_cache_lines() -> None:
    groups = [L.RH_MAGIC, L.RH_TAIL, L.RH_HEAD, L.RH_WANT_SPACE, L.RH_EMBEDDED_CONSUMER_BELL,
              L.RH_EMBEDDED_PRODUCER_BELL, L.RH_NEXT_SEQ]
    lines = [g // L.CACHE_LINE for g in groups]
    assert len(set(lines)) == len(lines)
    assert all(g % L.CACHE_LINE == 0 for g in groups)


def test_record_limit_is_half_the_capacity() -> None:
    assert L.max_record_size(4096) == 2048 - L.RECORD_HEADER_SIZE
