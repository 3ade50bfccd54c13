"""Which instance of a cluster a request goes to: prefix affinity under a load bound.

Pure (no I/O, no clock); runs in the client's process (libllm.cluster), under its lock.
Each request names a preferred instance by the hash of its prompt's first full KV blocks
(rendezvous hashing over the live instances: the same prefix prefers the same instance,
and an instance leaving moves only its own prefixes), so a shared system prompt is
computed once per instance that serves it and then read from that instance's prefix cache.
The preference holds while the preferred instance carries at most `load_factor` times the
mean outstanding tokens before this request (bounded-load consistent hashing); past that,
the request goes to the instance where its tenant has least outstanding, then the least loaded. Spreading
each tenant's overflow evenly is what makes the instances' own fair share add up to a
fair share of the whole cluster: every instance sees every busy tenant.
"""

from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from llmos.libllm.blockhash import ROOT_HASH, block_name

AFFINITY_BLOCKS = 4  # the prefix that names a request's instance: up to this many full blocks
LOAD_FACTOR = 1.5  # the preferred instance is passed over beyond this times the mean load


@dataclass(slots=True)
class InstanceLoad:
    """What one instance has outstanding: tokens still to compute (prompt and output)."""

    tokens: int = 0
    requests: int = 0
    by_tenant: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    routed: int = 0  # requests sent to it, ever (a figure for `status` and the tests)
    affine: int = 0  # of which went to it as their prefix's preferred instance


def prefix_key(prompt_ids: Sequence[int], block_tokens: int, blocks: int = AFFINITY_BLOCKS) -> int | None:
    """The chained hash of the prompt's first full blocks (the scheduler's block names);
    None for a prompt shorter than one block (nothing to share)."""
    full = min(blocks, len(prompt_ids) // block_tokens)
    key = ROOT_HASH
    for b in range(full):
        key = block_name(key, prompt_ids[b * block_tokens:(b + 1) * block_tokens])
    return key if full else None


def _score(key: int, instance: str) -> bytes:
    return hashlib.blake2b(struct.pack("<QQ", key & (2**64 - 1), key >> 64) + instance.encode(),
                           digest_size=8).digest()


class Router:
    """The live instances and their loads; `choose` one for a request, then tell it what the
    request did (`progress`, `ended`) so the loads stay true."""

    def __init__(self, block_tokens: int, load_factor: float = LOAD_FACTOR) -> None:
        if block_tokens < 1 or load_factor < 1.0:
            raise ValueError("block_tokens must be >= 1 and load_factor >= 1")
        self.block_tokens = block_tokens
        self.load_factor = load_factor
        self.loads: dict[str, InstanceLoad] = {}

    def set_instances(self, names: Iterable[str]) -> None:
        """The instances now live: new ones start empty, gone ones are forgotten."""
        names = set(names)
        for gone in set(self.loads) - names:
            del self.loads[gone]
        for name in names - set(self.loads):
            self.loads[name] = InstanceLoad()

    def preferred(self, key: int) -> str:
        """The instance a prefix prefers: the highest rendezvous score among the live ones."""
        return max(self.loads, key=lambda name: _score(key, name))

    def choose(self, prompt_ids: Sequence[int], cost: int, tenant: str = "") -> str:
        """The instance for a request of `cost` tokens (prompt + max output), and count it there.

        Raises:
            LookupError: no live instance.
        """
        live = self.loads
        if not live:
            raise LookupError("no live instance")
        key = prefix_key(prompt_ids, self.block_tokens)
        chosen, affine = None, False
        if key is not None:
            best = self.preferred(key)
            mean = sum(load.tokens for load in live.values()) / len(live)
            if live[best].tokens <= self.load_factor * mean:  # (an idle cluster: any instance is in bound)
                chosen, affine = best, True
        if chosen is None:
            # Ties (an idle cluster) go to the least used so far: every instance takes its turn,
            # and one just added is used first, not only once the others are busy.
            chosen = min(live, key=lambda n: (live[n].by_tenant.get(tenant, 0), live[n].tokens, live[n].routed, n))
        load = live[chosen]
        load.tokens += cost
        load.requests += 1
        load.by_tenant[tenant] += cost
        load.routed += 1
        load.affine += affine
        return chosen

    def progress(self, name: str, tenant: str, tokens: int) -> None:
        """`tokens` of a request's outstanding ones are done."""
        load = self.loads.get(name)
        if load is not None:
            load.tokens = max(0, load.tokens - tokens)
            load.by_tenant[tenant] = max(0, load.by_tenant[tenant] - tokens)

    def ended(self, name: str, tenant: str, remaining: int) -> None:
        """A request ended (or its instance failed it) with `remaining` tokens never done."""
        self.progress(name, tenant, remaining)
        load = self.loads.get(name)
        if load is not None:
            load.requests = max(0, load.requests - 1)
            if not load.by_tenant[tenant]:
                del load.by_tenant[tenant]
