"""The memory server: KV blocks, prefix cache, segments and quotas, all over the arena.

Layers, bottom up: `tables` (the byte layout in ALLOC_TABLES, and `tables_size` for the
supervisor), `quotas`, `allocator` (BlockAllocator: blocks, refcounts, copy-on-write,
leases), `prefix_cache` (chained hashes, hit rate), `segments` (best fit, coalescing,
handles), `manager` (all of it, plus reclamation). Pure logic: no processes, no messages.
"""

from __future__ import annotations

from servers.memory.allocator import BlockAllocator as BlockAllocator
from servers.memory.allocator import BlockStats as BlockStats
from servers.memory.allocator import CowResult as CowResult
from servers.memory.manager import MemoryConfig as MemoryConfig
from servers.memory.manager import MemoryManager as MemoryManager
from servers.memory.manager import MemoryStats as MemoryStats
from servers.memory.manager import Reclaimed as Reclaimed
from servers.memory.prefix_cache import ROOT_HASH as ROOT_HASH
from servers.memory.prefix_cache import PrefixCache as PrefixCache
from servers.memory.prefix_cache import PrefixMatch as PrefixMatch
from servers.memory.prefix_cache import PrefixStats as PrefixStats
from servers.memory.prefix_cache import block_hashes as block_hashes
from servers.memory.prefix_cache import chain_hash as chain_hash
from servers.memory.quotas import ClientQuota as ClientQuota
from servers.memory.quotas import QuotaConfig as QuotaConfig
from servers.memory.segments import SegmentAllocator as SegmentAllocator
from servers.memory.segments import SegmentHandle as SegmentHandle
from servers.memory.segments import SegmentInfo as SegmentInfo
from servers.memory.segments import SegmentStats as SegmentStats
from servers.memory.tables import BlockState as BlockState
from servers.memory.tables import MemoryTables as MemoryTables
from servers.memory.tables import SegmentState as SegmentState
from servers.memory.tables import arena_bytes as arena_bytes
from servers.memory.tables import memory_regions as memory_regions
from servers.memory.tables import tables_size as tables_size

__all__ = [
    "ROOT_HASH",
    "BlockAllocator",
    "BlockState",
    "BlockStats",
    "ClientQuota",
    "CowResult",
    "MemoryConfig",
    "MemoryManager",
    "MemoryStats",
    "MemoryTables",
    "PrefixCache",
    "PrefixMatch",
    "PrefixStats",
    "QuotaConfig",
    "Reclaimed",
    "SegmentAllocator",
    "SegmentHandle",
    "SegmentInfo",
    "SegmentState",
    "SegmentStats",
    "arena_bytes",
    "block_hashes",
    "chain_hash",
    "memory_regions",
    "tables_size",
]
