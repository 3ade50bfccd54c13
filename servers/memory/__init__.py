"""The memory server: KV blocks, segments and quotas, all over the arena.

Layers, bottom up: `tables` (the byte layout in ALLOC_TABLES, and `tables_size` for the
supervisor), `quotas`, `allocator` (BlockAllocator: the KV block pool, charged blocks for
clients that hold them themselves, the scheduler's lease), `segments` (best fit,
coalescing, handles), `manager` (all of it, plus reclamation). Pure logic: no processes, no
messages. The one prefix cache is the scheduler's, inside its lease
(servers/scheduler/block_cache.py).
"""

from __future__ import annotations

from llmos.servers.memory.allocator import BlockAllocator as BlockAllocator
from llmos.servers.memory.allocator import BlockStats as BlockStats
from llmos.servers.memory.manager import MemoryConfig as MemoryConfig
from llmos.servers.memory.manager import MemoryManager as MemoryManager
from llmos.servers.memory.manager import MemoryStats as MemoryStats
from llmos.servers.memory.manager import Reclaimed as Reclaimed
from llmos.servers.memory.quotas import ClientQuota as ClientQuota
from llmos.servers.memory.quotas import QuotaConfig as QuotaConfig
from llmos.servers.memory.segments import SegmentAllocator as SegmentAllocator
from llmos.servers.memory.segments import SegmentHandle as SegmentHandle
from llmos.servers.memory.segments import SegmentInfo as SegmentInfo
from llmos.servers.memory.segments import SegmentStats as SegmentStats
from llmos.servers.memory.tables import BlockState as BlockState
from llmos.servers.memory.tables import MemoryTables as MemoryTables
from llmos.servers.memory.tables import SegmentState as SegmentState
from llmos.servers.memory.tables import arena_bytes as arena_bytes
from llmos.servers.memory.tables import memory_regions as memory_regions
from llmos.servers.memory.tables import tables_size as tables_size

__all__ = [
    "BlockAllocator",
    "BlockState",
    "BlockStats",
    "ClientQuota",
    "MemoryConfig",
    "MemoryManager",
    "MemoryStats",
    "MemoryTables",
    "QuotaConfig",
    "Reclaimed",
    "SegmentAllocator",
    "SegmentHandle",
    "SegmentInfo",
    "SegmentState",
    "SegmentStats",
    "arena_bytes",
    "memory_regions",
    "tables_size",
]
