"""`llmos bench memory`: the memory server's pure logic, measured in one process.

Runs in the user's shell, no servers. Owns a private arena per scenario (created, then
closed and unlinked). Reports block allocate+free rate by batch size and segment external
fragmentation F under a random workload. (The prefix cache is the scheduler's; `llmos bench
serve` reports its hit rate H on a real instance.)
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmos.bench.report import table, write_json
from llmos.microkernel import Arena, Overloaded
from llmos.servers.memory import (
    MemoryConfig,
    MemoryManager,
    SegmentHandle,
    arena_bytes,
    memory_regions,
)

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
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    ns = p.parse_args(argv)
    try:
        ns.batches = [int(b) for b in ns.batches.split(",") if b]
    except ValueError:
        p.error("--batches takes comma-separated integers")
    positive = ("blocks", "repeats", "segment_kib", "segment_ops")
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
    write_json(
        str(ns.json) if ns.json else None,
        {
            "benchmark": "memory",
            "args": {k: v for k, v in vars(ns).items() if k != "json"},
            "allocation": allocation,
            "fragmentation": frag,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
