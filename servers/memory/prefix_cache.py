"""Prefix cache: full KV blocks named by a 128-bit hash chained over their token ids.

Runs inside the memory server, on top of BlockAllocator (which keeps the hash index and the
LRU of unreferenced cached blocks in the arena's block table). The hashing rule is
libllm.blockhash's (the scheduler's block cache uses it too); this module validates and keeps
the hit-rate counters; never uses Python's hash(), whose value differs between processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from libllm.blockhash import ROOT_HASH as ROOT_HASH
from libllm.blockhash import chain as _chain
from microkernel.errors import InvalidRequest
from servers.memory._validate import U32_MAX, as_endpoint_id, as_in_range
from servers.memory.allocator import HASH_MAX, BlockAllocator
from servers.memory.quotas import INSTANCE_ID


def chain_hash(parent_hash: int, token_ids: Sequence[int] | np.ndarray) -> int:
    """blake2b-128 over the parent's 16 bytes (little-endian) and the ids as little-endian u32."""
    parent = as_in_range(parent_hash, "parent hash", 0, HASH_MAX)
    return _chain(parent, _as_tokens(token_ids).tobytes())


def block_hashes(
    token_ids: Sequence[int] | np.ndarray, block_tokens: int, parent_hash: int = ROOT_HASH
) -> list[int]:
    """The chained hash of every full block of `token_ids`; a partial tail block has none."""
    parent_hash = as_in_range(parent_hash, "parent hash", 0, HASH_MAX)
    block_tokens = as_in_range(block_tokens, "block_tokens", 1, U32_MAX)
    data = _as_tokens(token_ids).tobytes()
    step = 4 * block_tokens
    hashes = []
    for start in range(0, len(data) - step + 1, step):
        parent_hash = _chain(parent_hash, data[start : start + step])
        hashes.append(parent_hash)
    return hashes


@dataclass(slots=True, frozen=True)
class PrefixMatch:
    """The leading full blocks of a prompt found in the cache. `block_hashes[-1]` is the
    parent hash for publishing the next block (ROOT_HASH when nothing matched)."""

    num_tokens: int
    block_ids: tuple[int, ...]
    block_hashes: tuple[int, ...]

    @property
    def parent_hash(self) -> int:
        return self.block_hashes[-1] if self.block_hashes else ROOT_HASH


@dataclass(slots=True, frozen=True)
class PrefixStats:
    num_lookup_tokens: int
    num_hit_tokens: int
    num_cached_blocks: int
    num_evictions: int

    @property
    def hit_rate(self) -> float:
        """H: prompt tokens served from the cache / prompt tokens looked up."""
        return self.num_hit_tokens / self.num_lookup_tokens if self.num_lookup_tokens else 0.0


class PrefixCache:
    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.block_tokens = allocator.block_tokens
        self.num_lookup_tokens = 0
        self.num_hit_tokens = 0

    def match(
        self, token_ids: Sequence[int] | np.ndarray, owner_id: int, max_tokens: int | None = None
    ) -> PrefixMatch:
        """Query only: the cached prefix `owner_id` could share, at most `max_tokens` tokens
        (a scheduler passes len - 1, so one token is left to compute logits from)."""
        owner = as_endpoint_id(owner_id, "owner id")
        tokens = _as_tokens(token_ids)
        limit = (
            len(tokens)
            if max_tokens is None
            else as_in_range(max_tokens, "max_tokens", 0, len(tokens))
        )
        ids: list[int] = []
        hashes: list[int] = []
        parent = ROOT_HASH
        data = tokens[:limit].tobytes()
        step = 4 * self.block_tokens
        for start in range(0, len(data) - step + 1, step):
            parent = _chain(parent, data[start : start + step])
            block_id = self.allocator.cached_block_id(parent)
            if block_id is None or not self.allocator.is_shareable(block_id, owner):
                break
            ids.append(block_id)
            hashes.append(parent)
        return PrefixMatch(len(ids) * self.block_tokens, tuple(ids), tuple(hashes))

    def lookup(
        self,
        token_ids: Sequence[int] | np.ndarray,
        owner_id: int,
        client_id: int = INSTANCE_ID,
        max_tokens: int | None = None,
    ) -> PrefixMatch:
        """Share the cached prefix of a new sequence (one reference per block) and count H.

        Raises:
            InvalidRequest: bad token ids or ids. QuotaExceeded: reviving the cached blocks
                would take the client past its quota; nothing is shared or counted then.
        """
        found = self.match(token_ids, owner_id, max_tokens)
        self.allocator.acquire(owner_id, found.block_ids, client_id)
        self.num_lookup_tokens += len(token_ids)  # the whole prompt, whatever max_tokens says
        self.num_hit_tokens += found.num_tokens
        return found

    def publish(
        self, owner_id: int, block_id: int, parent_hash: int, token_ids: Sequence[int] | np.ndarray
    ) -> int:
        """Name a computed full block by its chained hash; returns the hash (the next
        block's parent) whether or not another block already held that content."""
        parent = as_in_range(parent_hash, "parent hash", 0, HASH_MAX)
        tokens = _as_tokens(token_ids)
        if len(tokens) != self.block_tokens:
            raise InvalidRequest(f"a full block has {self.block_tokens} tokens, got {len(tokens)}")
        content_hash = _chain(parent, tokens.tobytes())
        self.allocator.publish(owner_id, block_id, content_hash)
        return content_hash

    def stats(self) -> PrefixStats:
        return PrefixStats(
            self.num_lookup_tokens,
            self.num_hit_tokens,
            self.allocator.num_cached,
            self.allocator.num_evictions,
        )


def _as_tokens(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as little-endian u32, refusing anything that is not an id."""
    if isinstance(token_ids, (str, bytes)):
        raise InvalidRequest(f"token ids must be integers, got {type(token_ids).__name__}")
    try:
        wide = np.asarray(token_ids)
    except (ValueError, TypeError):
        raise InvalidRequest("token ids must be a flat sequence of integers") from None
    if wide.ndim != 1 or (wide.size and wide.dtype.kind not in "iu"):
        raise InvalidRequest(
            f"token ids must be a flat sequence of integers, got dtype {wide.dtype} shape {wide.shape}"
        )
    if wide.size and (int(wide.min()) < 0 or int(wide.max()) > U32_MAX):
        raise InvalidRequest(f"token ids must be in [0, {U32_MAX}]")
    return wide.astype("<u4", copy=False)
