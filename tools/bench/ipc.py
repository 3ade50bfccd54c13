"""`llmos bench ipc`: our ring beside the usual ways two processes talk, in one run.

Interleaved repetitions (each transport once per round, in turn), medians per
transport, and ratios against multiprocessing.Queue as median [min-max] over the
repetitions (docs/design.md, Targets). Runs in the user's shell; starts its own children.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from typing import Any

import numpy as np

from llmos.bench import ipc_peers as peers
from llmos.bench.report import Ratio, ratio, table, us, write_json

BASELINE = "mp.Queue"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="llmos bench ipc", description=__doc__)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    p.add_argument("--rounds", type=int, default=5000, help="round trips per transport per repetition")
    p.add_argument("--count", type=int, default=1_000_000, help="records per one-way throughput run")
    p.add_argument("--mib", type=int, default=200, help="MiB per 1 MiB-handoff run")
    p.add_argument("--cpu-seconds", type=float, default=3.0, help="how long the parked consumer is watched")
    p.add_argument("--only", default="", help="comma-separated round-trip transports to run (default: all)")
    p.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--no-pin", action="store_true", help="let the scheduler place both processes")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.reps, ns.rounds, ns.count, ns.mib, ns.cpu_seconds = 2, 300, 20_000, 4, 0.3
    if ns.reps < 1 or ns.rounds < 10 or ns.count < 1000 or ns.mib < 1:
        p.error("need --reps >= 1, --rounds >= 10, --count >= 1000, --mib >= 1")
    return ns


def round_trips(ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[float]]]:
    transports = peers.available_round_trips()
    if ns.only:
        wanted = {w.strip() for w in ns.only.split(",")} | {BASELINE}
        transports = {k: v for k, v in transports.items() if k in wanted}
    medians: dict[str, list[float]] = {name: [] for name in transports}
    p99s: dict[str, list[float]] = {name: [] for name in transports}
    warmup = ns.rounds // 10
    for _rep in range(ns.reps):
        for name, run in transports.items():
            samples = run(ns.rounds + warmup)[warmup:]
            medians[name].append(float(np.median(samples)))
            p99s[name].append(float(np.percentile(samples, 99)))
    results = {
        name: {
            "median_ns": statistics.median(medians[name]),
            "p99_ns": statistics.median(p99s[name]),
            "medians_ns": medians[name],
        }
        for name in transports
    }
    return results, medians


def main(argv: list[str]) -> int:
    ns = parse(argv)
    peers.PIN["enabled"] = peers.PIN["enabled"] and not ns.no_pin
    pinning = "the two processes pinned to separate CPUs" if peers.PIN["enabled"] else "unpinned"
    print(f"llmos bench ipc: {platform.machine()}, {ns.reps} interleaved repetitions, {pinning}\n")
    with peers.pinned_parent():
        return run(ns)


def run(ns: argparse.Namespace) -> int:

    rt, medians = round_trips(ns)
    base = medians[BASELINE]
    rows = []
    for name, r in rt.items():
        vs_queue = ratio(base, medians[name])
        r["speedup_vs_mp_queue"] = {"median": vs_queue.median, "low": vs_queue.low, "high": vs_queue.high}
        rows.append([name, us(r["median_ns"]), us(r["p99_ns"]), str(vs_queue)])
    print("64-byte round trip between two processes")
    print(table(["transport", "median us", "p99 us", "faster than mp.Queue"], rows))
    floors: dict[str, Ratio] = {}
    if "ring parked" in medians and "C futex (floor)" in medians:
        floors["ring_parked_over_c_futex"] = ratio(medians["ring parked"], medians["C futex (floor)"])
    if "ring parked" in medians and "POSIX message queue" in medians:
        floors["ring_parked_over_posix_mq"] = ratio(medians["ring parked"], medians["POSIX message queue"])
    if "ring spin" in medians and "C spin (floor)" in medians:
        floors["ring_spin_over_c_spin"] = ratio(medians["ring spin"], medians["C spin (floor)"])
    for key, value in floors.items():
        print(f"  {key.replace('_', ' ')}: {value}")

    single, batched, queue_rate = [], [], []
    for _rep in range(ns.reps):
        single.append(peers.oneway_ring(ns.count, 1))
        batched.append(peers.oneway_ring(ns.count, 256))
        queue_rate.append(peers.oneway_mp_queue(max(1000, ns.count // 20)))
    print("\nOne-way 64-byte records per second")
    print(table(
        ["transport", "records/s", "vs mp.Queue"],
        [
            ["ring, one call per record", f"{statistics.median(single):,.0f}", str(ratio(single, queue_rate))],
            ["ring, send_many/recv_many", f"{statistics.median(batched):,.0f}", str(ratio(batched, queue_rate))],
            ["mp.Queue", f"{statistics.median(queue_rate):,.0f}", "1x"],
        ],
    ))

    arena_bw, queue_bw = [], []
    for _rep in range(ns.reps):
        arena_bw.append(peers.handoff_arena(ns.mib))
        queue_bw.append(peers.handoff_mp_queue(ns.mib))
    print("\n1 MiB handoff")
    print(table(
        ["transport", "GB/s", "vs mp.Queue"],
        [
            ["arena reference over a ring", f"{statistics.median(arena_bw) / 1e9:.2f}", str(ratio(arena_bw, queue_bw))],
            ["mp.Queue (pickled)", f"{statistics.median(queue_bw) / 1e9:.2f}", "1x"],
        ],
    ))

    cpu = peers.parked_cpu_share(ns.cpu_seconds)
    print(f"\nParked consumer CPU over {ns.cpu_seconds:g} s: {cpu * 100:.2f}%")

    write_json(ns.json, {
        "round_trip_64b": rt,
        "ratios": {k: {"median": v.median, "low": v.low, "high": v.high} for k, v in floors.items()},
        "oneway_64b_records_per_s": {
            "ring_single": single, "ring_batched": batched, "mp_queue": queue_rate,
        },
        "handoff_1mib_bytes_per_s": {"arena": arena_bw, "mp_queue": queue_bw},
        "parked_consumer_cpu_share": cpu,
        "reps": ns.reps,
        "pinned": peers.PIN["enabled"],
    })
    return 0
