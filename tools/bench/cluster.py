"""`llmos bench cluster`: what the front door costs. The same workload through libllm.cluster
(router, Ray actor call per request, token batches as Ray objects) and through libllm
straight to the same instance, interleaved, on a Ray test cluster of one or more nodes on
this machine (ray.cluster_utils.Cluster). Aggregate tokens/s and median TTFT, as ratios
median [min-max] over the repetitions. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import msgspec

from llmos.bench.report import ratio, table, write_json


def run_load(session: Any, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """(generated tokens/s, median TTFT in s) of `clients` threads each streaming `requests`."""
    ttfts: list[float] = []

    def client(c: int) -> int:
        made = 0
        for r in range(requests):
            start = time.perf_counter()
            request = session.stream(f"Client {c} asks story {r}: once", max_tokens=max_tokens, temperature=0.8,
                                     seed=c * 1000 + r)
            first = True
            for _ in request:
                if first:
                    ttfts.append(time.perf_counter() - start)
                    first = False
            made += len(request.completion().token_ids)
        return made

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(client, range(clients)))
    return tokens / (time.perf_counter() - start), statistics.median(ttfts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmos bench cluster", description=__doc__)
    p.add_argument("--nodes", type=int, default=1, help="Ray nodes (each its own instance) on this machine")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=4, help="per client")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", help="a GGUF file (default: the built-in model)")
    p.add_argument("--json", help="write the figures here")
    ns = p.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from llmos import libllm
    from llmos.cluster import commands
    from llmos.config import load_config
    from llmos.libllm import cluster

    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(ns.nodes - 1):
        ray_cluster.add_node(num_cpus=1)
    config = load_config(None)
    if ns.model:
        config = replace(config, model=replace(config.model, path=ns.model))
    config = replace(config, gateway=replace(config.gateway, port=0))
    try:
        ray.init(address=ray_cluster.address, namespace=cluster.NAMESPACE, log_to_driver=False)
        rows = commands.up(ray_cluster.address, msgspec.to_builtins(config), 600.0, "bench")
        front = cluster.connect(ray_cluster.address)
        direct = libllm.connect(rows[0]["instance"])
        results: dict[str, list[tuple[float, float]]] = {"front door": [], "direct": []}
        run_load(front, ns.clients, 1, 8)  # warm both paths
        run_load(direct, ns.clients, 1, 8)
        for _ in range(ns.repeat):
            results["front door"].append(run_load(front, ns.clients, ns.requests, ns.max_tokens))
            results["direct"].append(run_load(direct, ns.clients, ns.requests, ns.max_tokens))
        direct.close()
    finally:
        commands.down(ray_cluster.address)
        ray.shutdown()
        ray_cluster.shutdown()  # type: ignore[no-untyped-call]
    f, d = results["front door"], results["direct"]
    tps = ratio([x[0] for x in f], [x[0] for x in d])
    ttft = ratio([x[1] for x in f], [x[1] for x in d])
    print(table(["path", "tokens/s (median)", "TTFT ms (median)"],
                [[name, f"{statistics.median(x[0] for x in runs):.0f}",
                  f"{1000 * statistics.median(x[1] for x in runs):.1f}"] for name, runs in results.items()]))
    print(f"front door / direct ({ns.nodes} node(s), {ns.clients} clients): tokens/s {tps}, TTFT {ttft}")
    write_json(ns.json, {"nodes": ns.nodes, "clients": ns.clients, "results": results,
                         "tokens_per_s_ratio": str(tps), "ttft_ratio": str(ttft)})
    return 0
