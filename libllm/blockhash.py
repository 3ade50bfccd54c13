"""The name of a full KV block: a blake2b-128 hash chained over the token ids of every block
up to and including it, so equal names mean equal prefixes and so equal KV.

Pure; the rule the scheduler's prefix cache names its blocks by (servers/scheduler/prefix.py),
kept with the pure modules servers share (docs/design.md). Never Python's hash(), whose
value differs between processes.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT_HASH = 0  # the parent of a sequence's first block


def chain(parent_hash: int, token_bytes: bytes) -> int:
    """The name of a block holding `token_bytes` (ids as little-endian u32) after `parent_hash`."""
    data = parent_hash.to_bytes(16, "little") + token_bytes
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "little")


def block_name(parent_hash: int, token_ids: Sequence[int]) -> int:
    """`chain` over a block's token ids."""
    return chain(parent_hash, struct.pack(f"<{len(token_ids)}I", *token_ids))
