"""The scheduler server: requests, sequences, block tables, policies, continuous batching.

Layers, bottom up: `config` (SchedulerConfig), `sequence` (Sequence, Sampling), `blocks`
(the BlockSource protocol, FreeListBlocks), `block_cache` (CachedBlocks: reference counts
and named blocks), `prefix` (which blocks a sequence shares), `plan` (StepPlan,
ChunkPlan), `events` (TokenEvent, FinishEvent), `policy` (the Policy seam, fcfs), `fair`
and `policies` (priority, rr, fair; make_policy), `stats` (SchedulerStats), `scheduler`
(Scheduler). Pure logic: no processes, no messages, no arena; the server loop wraps it.
The loop's own decisions are pure too: `requests` (what each client is sent), `backpressure`,
`lease`, `runner_links`; `server` does their I/O. Imports no other server.
"""

from __future__ import annotations

from llmos.servers.scheduler.block_cache import CachedBlocks as CachedBlocks
from llmos.servers.scheduler.blocks import BlockSource as BlockSource
from llmos.servers.scheduler.blocks import FreeListBlocks as FreeListBlocks
from llmos.servers.scheduler.config import SchedulerConfig as SchedulerConfig
from llmos.servers.scheduler.events import Event as Event
from llmos.servers.scheduler.events import FinishEvent as FinishEvent
from llmos.servers.scheduler.events import TokenEvent as TokenEvent
from llmos.servers.scheduler.fair import Fair as Fair
from llmos.servers.scheduler.plan import ChunkPlan as ChunkPlan
from llmos.servers.scheduler.plan import StepPlan as StepPlan
from llmos.servers.scheduler.policies import Priority as Priority
from llmos.servers.scheduler.policies import RoundRobin as RoundRobin
from llmos.servers.scheduler.policies import make_policy as make_policy
from llmos.servers.scheduler.policy import Fcfs as Fcfs
from llmos.servers.scheduler.policy import Policy as Policy
from llmos.servers.scheduler.scheduler import Scheduler as Scheduler
from llmos.servers.scheduler.sequence import GREEDY as GREEDY
from llmos.servers.scheduler.sequence import FinishReason as FinishReason
from llmos.servers.scheduler.sequence import Sampling as Sampling
from llmos.servers.scheduler.sequence import SeqStatus as SeqStatus
from llmos.servers.scheduler.sequence import Sequence as Sequence
from llmos.servers.scheduler.stats import SchedulerStats as SchedulerStats

__all__ = [
    "GREEDY",
    "BlockSource",
    "CachedBlocks",
    "ChunkPlan",
    "Event",
    "Fair",
    "Fcfs",
    "FinishEvent",
    "FinishReason",
    "FreeListBlocks",
    "Policy",
    "Priority",
    "RoundRobin",
    "Sampling",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "SeqStatus",
    "Sequence",
    "StepPlan",
    "TokenEvent",
    "make_policy",
]
