"""`llmos bench cluster`: what the front door costs. The same workload through libllm.cluster
(router, Ray actor call per request, token batches as Ray objects) and through libllm
straight to the same instance; and over HTTP, through the cluster's front door and through
that instance's own gateway; interleaved, on a Ray test cluster of one or more nodes on
this machine (ray.cluster_utils.Cluster). Aggregate tokens/s and median TTFT, as ratios
median [min-max] over the repetitions. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec

from llmos.bench.report import ratio, table, write_json


def closed_loop(clients: int, requests: int, one: Callable[[int, int, list[float]], int]) -> tuple[float, float]:
    """(generated tokens/s, median TTFT in s) of `clients` threads each making `requests`
    streams one after the other: `one(client, request, ttfts)` streams one, appends its TTFT
    and returns its tokens."""
    ttfts: list[float] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(lambda c: sum(one(c, r, ttfts) for r in range(requests)), range(clients)))
    return tokens / (time.perf_counter() - start), statistics.median(ttfts)


def prompt_of(c: int, r: int) -> str:
    return f"Client {c} asks story {r}: once"


def run_load(session: Any, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """`closed_loop` through a libllm session (or a libllm.cluster one)."""
    def one(c: int, r: int, ttfts: list[float]) -> int:
        start = time.perf_counter()
        request = session.stream(prompt_of(c, r), max_tokens=max_tokens, temperature=0.8, seed=c * 1000 + r)
        first = True
        for _ in request:
            if first:
                ttfts.append(time.perf_counter() - start)
                first = False
        return len(request.completion().token_ids)

    return closed_loop(clients, requests, one)


def run_http_load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple[float, float]:
    """`closed_loop` of streamed completions over HTTP (SSE) from `url`, the same requests."""
    import httpx

    connections: dict[int, httpx.Client] = {}  # one per client, kept alive across its requests

    def one(c: int, r: int, ttfts: list[float]) -> int:
        http = connections.get(c)
        if http is None:  # (each client is one thread: no race)
            http = connections[c] = httpx.Client(base_url=url, timeout=600.0)
        start = time.perf_counter()
        body = {"model": model, "prompt": prompt_of(c, r), "max_tokens": max_tokens, "temperature": 0.8,
                "seed": c * 1000 + r, "stream": True, "stream_options": {"include_usage": True}}
        made, first = 0, True
        with http.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if first and event["choices"] and event["choices"][0]["text"]:
                    ttfts.append(time.perf_counter() - start)
                    first = False
                if event.get("usage"):
                    made = event["usage"]["completion_tokens"]
        return made

    try:
        return closed_loop(clients, requests, one)
    finally:
        for http in connections.values():
            http.close()


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
        door = commands.front_door(ray_cluster.address)
        assert door is not None
        model = Path(front.info.model_path).stem
        paths: dict[str, Callable[[int, int], tuple[float, float]]] = {
            "libllm.cluster": lambda n, t: run_load(front, ns.clients, n, t),
            "libllm direct": lambda n, t: run_load(direct, ns.clients, n, t),
            "HTTP front door": lambda n, t: run_http_load(door["url"], model, ns.clients, n, t),
            "HTTP node gateway": lambda n, t: run_http_load(rows[0]["url"], model, ns.clients, n, t)}
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for run in paths.values():
            run(1, 8)  # warm every path
        for _ in range(ns.repeat):
            for name, run in paths.items():
                results[name].append(run(ns.requests, ns.max_tokens))
        direct.close()
    finally:
        commands.down(ray_cluster.address)
        ray.shutdown()
        ray_cluster.shutdown()  # type: ignore[no-untyped-call]
    print(table(["path", "tokens/s (median)", "TTFT ms (median)"],
                [[name, f"{statistics.median(x[0] for x in runs):.0f}",
                  f"{1000 * statistics.median(x[1] for x in runs):.1f}"] for name, runs in results.items()]))
    ratios = {}
    for label, over, under in (("libllm", "libllm.cluster", "libllm direct"),
                               ("HTTP", "HTTP front door", "HTTP node gateway")):
        tps = ratio([x[0] for x in results[over]], [x[0] for x in results[under]])
        ttft = ratio([x[1] for x in results[over]], [x[1] for x in results[under]])
        ratios[label] = {"tokens_per_s_ratio": str(tps), "ttft_ratio": str(ttft)}
        print(f"{over} / {under} ({ns.nodes} node(s), {ns.clients} clients): tokens/s {tps}, TTFT {ttft}")
    write_json(ns.json, {"nodes": ns.nodes, "clients": ns.clients, "results": results, "ratios": ratios})
    return 0
