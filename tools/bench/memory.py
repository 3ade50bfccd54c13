"""`llmos bench memory`: the memory server's pure logic, measured in one process.

Runs in the user's shell, no servers. Owns a private arena per scenario (created, then
closed and unlinked). Reports block allocate+free rate by batch size, segment external
fragmentation F under a random workload, and prefix-cache hit rate H on a shared-prefix
workload against the ideal H of an infinite cache.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from microkernel import Arena, Overloaded
from servers.memory import (
    MemoryConfig,
    MemoryManager,
    SegmentHandle,
    arena_bytes,
    block_hashes,
    memory_regions,
)
from tools.bench.report import table, write_json

_names = itertools.count()


@contextmanager
def memory_arena(
    num_blocks: int, block_bytes: int, block_tokens: int, segment_bytes: int
) -> Iterator[MemoryManager]:
    regions = memory_regions(num_blocks * block_bytes, block_bytes, segment_bytes)
    name = f"llmos.bench-memory-{os.getpid()}-{next(_names)}"
    with Arena.create(name, arena_bytes(regions), regions) as arena:
        yield MemoryManager.format(arena, MemoryConfig(block_bytes, block_tokens))


def bench_allocation(num_blocks: int, batch: int, seconds: float) -> float:
    """allocate+free pairs of `batch` blocks per second, with the pool half full."""
    with memory_arena(num_blocks, 64, 16, 0) as memory:
        blocks = memory.blocks
        blocks.allocate(num_blocks // 2, 1, 1)
        num_pairs = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while True:
            for _ in range(16):
                blocks.free(1, blocks.allocate(batch, 1, 1))
            num_pairs += 16
            if time.perf_counter() >= deadline:
                break
        return num_pairs / (time.perf_counter() - start)


def bench_fragmentation(
    segment_bytes: int, num_ops: int, occupancy: float, seed: int
) -> dict[str, Any]:
    """Random allocate/free of log-uniform sizes (64 B .. segment_bytes/64) around a target occupancy."""
    rng = random.Random(seed)
    max_size = max(128, segment_bytes // 64)
    with memory_arena(1, 64, 16, segment_bytes) as memory:
        segments = memory.segments
        live: list[SegmentHandle] = []
        samples: list[float] = []
        num_refused = 0
        num_refused_fragmented = 0  # refused although enough bytes were free in total
        for _ in range(num_ops):
            stats = segments.stats()
            if live and (stats.used_bytes >= occupancy * segment_bytes or rng.random() < 0.3):
                segments.free(live.pop(rng.randrange(len(live))), 1)
            else:
                size = int(math.exp(rng.uniform(math.log(64), math.log(max_size))))
                try:
                    live.append(segments.allocate(size, 1, 1))
                except Overloaded:
                    num_refused += 1
                    num_refused_fragmented += stats.free_bytes >= size
            samples.append(segments.stats().external_fragmentation)
        final = segments.stats()
        return {
            "ops": num_ops,
            "f_mean": statistics.fmean(samples),
            "f_p50": statistics.median(samples),
            "f_max": max(samples),
            "f_final": final.external_fragmentation,
            "occupancy_final": final.used_bytes / segment_bytes,
            "refused": num_refused,
            "refused_fragmented": num_refused_fragmented,
            "segments_final": final.num_segments,
        }


def shared_prefix_prompts(
    num_prompts: int, num_systems: int, system_tokens: int, seed: int
) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 32000) for _ in range(system_tokens)] for _ in range(num_systems)]
    # Zipf-like popularity: a few system prompts carry most of the traffic.
    weights = [1 / (i + 1) for i in range(num_systems)]
    return [
        [
            *rng.choices(systems, weights)[0],
            *(rng.randrange(3, 32000) for _ in range(rng.randint(1, 64))),
        ]
        for _ in range(num_prompts)
    ]


def bench_prefix(
    prompts: list[list[int]], cache_blocks: int, block_tokens: int, in_flight: int
) -> dict[str, Any]:
    """Serve prompts as a scheduler would (share, allocate, publish, release when done)
    with `in_flight` sequences alive, and compare H with an infinite cache's."""
    seen: set[int] = set()
    ideal_hits = ideal_looked_up = 0
    with memory_arena(cache_blocks, 64, block_tokens, 0) as memory:
        cache, blocks = memory.prefix, memory.blocks
        running: deque[list[int]] = deque()
        start = time.perf_counter()
        for prompt in prompts:
            hashes = block_hashes(prompt[:-1], block_tokens)  # the last token is always computed
            hit = next((i for i, h in enumerate(hashes) if h not in seen), len(hashes))
            ideal_hits += hit * block_tokens
            ideal_looked_up += len(prompt)
            seen.update(hashes)
            found = cache.lookup(prompt, 1, 1, max_tokens=len(prompt) - 1)
            num_new = -(-len(prompt) // block_tokens) - len(found.block_ids)
            while not blocks.can_allocate(num_new) and running:
                blocks.free(1, running.popleft()[::-1])  # tail first: it is the least shared
            if not blocks.can_allocate(num_new):
                blocks.free(1, found.block_ids)
                continue  # a prompt larger than the whole cache: skipped
            fresh = blocks.allocate(num_new, 1, 1)
            parent = found.parent_hash
            first = len(found.block_ids)
            for i, block_id in enumerate(fresh[: len(prompt) // block_tokens - first]):
                start_token = (first + i) * block_tokens
                parent = cache.publish(
                    1, block_id, parent, prompt[start_token : start_token + block_tokens]
                )
            running.append([*found.block_ids, *fresh])
            if len(running) > in_flight:
                blocks.free(1, running.popleft()[::-1])
        seconds = time.perf_counter() - start
        stats = cache.stats()
    ideal = ideal_hits / ideal_looked_up
    return {
        "prompts": len(prompts),
        "cache_blocks": cache_blocks,
        "hit_rate": stats.hit_rate,
        "ideal_hit_rate": ideal,
        "ratio_to_ideal": stats.hit_rate / ideal if ideal else 1.0,
        "evictions": stats.num_evictions,
        "requests_per_s": len(prompts) / seconds,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmos bench memory", description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4096, help="KV blocks in the pool")
    p.add_argument("--batches", default="1,16,64", help="comma-separated allocation batch sizes")
    p.add_argument("--seconds", type=float, default=0.3, help="time per allocation measurement")
    p.add_argument(
        "--repeats", type=int, default=5, help="repetitions per batch size (median reported)"
    )
    p.add_argument("--segment-kib", type=int, default=16 * 1024, help="segment region size")
    p.add_argument("--segment-ops", type=int, default=20000, help="random segment operations")
    p.add_argument(
        "--occupancy", type=float, default=0.8, help="target share of segment bytes in use"
    )
    p.add_argument(
        "--prompts", type=int, default=2000, help="prompts in the shared-prefix workload"
    )
    p.add_argument("--systems", type=int, default=16, help="distinct shared system prompts")
    p.add_argument("--system-tokens", type=int, default=256, help="tokens per system prompt")
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per KV block")
    p.add_argument(
        "--cache-blocks", type=int, default=512, help="KV blocks the prefix workload may use"
    )
    p.add_argument("--in-flight", type=int, default=8, help="sequences alive at once")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = p.parse_args(argv)
    try:
        ns.batches = [int(b) for b in ns.batches.split(",") if b]
    except ValueError:
        p.error("--batches takes comma-separated integers")
    positive = (
        "blocks",
        "repeats",
        "segment_kib",
        "segment_ops",
        "prompts",
        "systems",
        "system_tokens",
        "block_tokens",
        "cache_blocks",
        "in_flight",
    )
    if not ns.batches or min(ns.batches) <= 0 or max(ns.batches) > ns.blocks // 2:
        p.error("batch sizes must be positive and at most half of --blocks")
    if (
        any(getattr(ns, name) <= 0 for name in positive)
        or ns.seconds <= 0
        or not 0 < ns.occupancy <= 1
    ):
        p.error("sizes, counts and --seconds must be positive; --occupancy in (0, 1]")
    return ns


def main(argv: list[str]) -> int:
    ns = parse_args(argv)
    allocation = []
    for batch in ns.batches:
        runs = [bench_allocation(ns.blocks, batch, ns.seconds) for _ in range(ns.repeats)]
        pairs = statistics.median(runs)
        allocation.append(
            {"batch": batch, "pairs_per_s": pairs, "blocks_per_s": pairs * batch, "runs": runs}
        )
    print(
        table(
            ["batch", "alloc+free/s", "blocks/s", "us/pair"],
            [
                [
                    r["batch"],
                    f"{r['pairs_per_s']:,.0f}",
                    f"{r['blocks_per_s']:,.0f}",
                    f"{1e6 / r['pairs_per_s']:.2f}",
                ]
                for r in allocation
            ],
        )
    )
    frag = bench_fragmentation(ns.segment_kib * 1024, ns.segment_ops, ns.occupancy, ns.seed)
    print()
    print(
        table(
            ["segments", "F mean", "F p50", "F max", "refused", "of which fragmented", "occupancy"],
            [
                [
                    frag["ops"],
                    f"{frag['f_mean']:.3f}",
                    f"{frag['f_p50']:.3f}",
                    f"{frag['f_max']:.3f}",
                    frag["refused"],
                    frag["refused_fragmented"],
                    f"{frag['occupancy_final']:.2f}",
                ]
            ],
        )
    )
    prompts = shared_prefix_prompts(ns.prompts, ns.systems, ns.system_tokens, ns.seed)
    prefix = bench_prefix(prompts, ns.cache_blocks, ns.block_tokens, ns.in_flight)
    print()
    print(
        table(
            ["prompts", "cache blocks", "H", "H ideal", "H / ideal", "evictions", "requests/s"],
            [
                [
                    prefix["prompts"],
                    prefix["cache_blocks"],
                    f"{prefix['hit_rate']:.3f}",
                    f"{prefix['ideal_hit_rate']:.3f}",
                    f"{prefix['ratio_to_ideal']:.3f}",
                    prefix["evictions"],
                    f"{prefix['requests_per_s']:,.0f}",
                ]
            ],
        )
    )
    write_json(
        str(ns.json) if ns.json else None,
        {
            "benchmark": "memory",
            "args": {k: v for k, v in vars(ns).items() if k != "json"},
            "allocation": allocation,
            "fragmentation": frag,
            "prefix": prefix,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
