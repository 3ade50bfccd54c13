"""`llmos cluster up|down|status`: one llmos instance per node of an existing Ray cluster.

Runs in the user's shell as a Ray driver. `up` takes `llmos serve`'s flags (the model, the
policy, ...): every node's instance gets the same config (the model must lie at the same
path on every node). It returns once every live node's instance is ready; the manager goes
on placing instances on nodes that join.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

import msgspec

from llmos import serve
from llmos.config import ConfigError
from llmos.libllm.cluster import NAMESPACE, init_ray

UP_TIMEOUT_S = 300.0
DEFAULT_PREFIX = "ray"  # a node's instance is named ray-<its Ray node id>


def add_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start an instance on every node (serve's flags)")
    up.add_argument("--address", default="auto", help="the Ray cluster (default: auto, the one this node is in)")
    up.add_argument("--timeout", type=float, default=UP_TIMEOUT_S, help="seconds to wait for every node")
    serve.add_arguments(up)  # (--instance: the prefix of each node's instance name)
    down = actions.add_parser("down", help="stop every node's instance")
    down.add_argument("--address", default="auto")
    status = actions.add_parser("status", help="each node's instance and figures")
    status.add_argument("--address", default="auto")
    status.add_argument("--json", action="store_true", help="machine-readable")


def _manager() -> Any:
    import ray

    from llmos.cluster.manager import MANAGER_NAME

    try:
        return ray.get_actor(MANAGER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def up(address: str, config: dict[str, Any], timeout: float = UP_TIMEOUT_S,
       prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Start (or join) the cluster's instances; each live node's row once all are ready.

    Raises:
        ConfigError: a cluster is already up with another config.  TimeoutError: a node's
        instance was not ready within `timeout` (the rows say why).
    """
    import ray

    from llmos.cluster.manager import MANAGER_NAME, ClusterManager

    init_ray(address)
    manager = _manager()
    if manager is None:
        manager = ray.remote(ClusterManager).options(name=MANAGER_NAME, namespace=NAMESPACE, lifetime="detached",
                                                     num_cpus=0, max_concurrency=8,
                                                     get_if_exists=True).remote(config, prefix)
    if not ray.get(manager.same_config.remote(config, prefix)):
        raise ConfigError("a cluster is already up with another config: `llmos cluster down` first")
    deadline = time.monotonic() + timeout
    while True:
        rows: list[dict[str, Any]] = ray.get(manager.status.remote())
        if rows and all(row["ready"] for row in rows):
            return rows
        if time.monotonic() > deadline:
            why = "; ".join(f"{row['node_id'][:12]}: {row.get('why')}" for row in rows if not row["ready"])
            raise TimeoutError(f"not every node's instance was ready within {timeout:g} s ({why})")
        time.sleep(0.5)


def down(address: str) -> int:
    """Stop every instance and the manager; how many instances stopped."""
    import ray

    init_ray(address)
    manager = _manager()
    if manager is None:
        return 0
    stopped = int(ray.get(manager.stop.remote()))
    ray.kill(manager, no_restart=True)
    return stopped


def status(address: str) -> list[dict[str, Any]]:
    import ray

    init_ray(address)
    manager = _manager()
    return [] if manager is None else list(ray.get(manager.status.remote()))


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'node':14} {'instance':18} {'ready':6} {'requests':>9} {'prefix hits':>12}  url"]
    for row in rows:
        stats = row.get("stats") or {}
        lines.append(f"{row['node_id'][:12]:14} {row.get('instance', '-'):18} {'yes' if row['ready'] else 'no':6} "
                     f"{stats.get('num_finished', '-')!s:>9} {_rate(stats.get('prefix_hit_rate'))!s:>12}  "
                     f"{row.get('url') or row.get('why', '')}")
    return "\n".join(lines)


def _rate(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, float) else "-"


def main(ns: argparse.Namespace) -> int:
    try:
        import ray  # noqa: F401
    except ImportError:
        print("llmos: `llmos cluster` needs Ray: pip install 'llmos[ray]'", file=sys.stderr)
        return 2
    try:
        if ns.action == "up":
            config = serve.config_for(ns)
            if ns.port is None:  # one gateway per node: several nodes may share a machine
                config = replace(config, gateway=replace(config.gateway, port=0))
            rows = up(ns.address, msgspec.to_builtins(config), ns.timeout, ns.instance or DEFAULT_PREFIX)
            print(_table(rows))
            print(f"llmos cluster: {len(rows)} instance(s) ready; libllm.cluster.connect({ns.address!r})")
            return 0
        if ns.action == "down":
            print(f"llmos cluster: {down(ns.address)} instance(s) stopped")
            return 0
        rows = status(ns.address)
        print(json.dumps(rows, indent=2) if ns.json else _table(rows) if rows else "llmos cluster: not up")
        return 0
    except (ConfigError, ValueError, TimeoutError, ConnectionError) as exc:
        print(f"llmos: {exc}", file=sys.stderr)
        return 2
