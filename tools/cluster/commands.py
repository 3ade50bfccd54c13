"""`llmos cluster up|down|status`: one llmos instance per node of an existing Ray cluster,
and one HTTP front door for all of them.

Runs in the user's shell as a Ray driver. `up` takes `llmos serve`'s flags (the model, the
policy, ...): every node's instance gets the same config (the model must lie at the same
path on every node; an instance serving another file is not used), and the front door
(front.py) the gateway's part of it (--host, --port, the API keys). It returns once every
live node's instance is ready and the front door serves; the manager goes on placing
instances on nodes that join.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import time
from typing import Any

import msgspec

from llmos import serve
from llmos.config import ConfigError
from llmos.libllm.cluster import NAMESPACE, init_ray

UP_TIMEOUT_S = 300.0
STATUS_TIMEOUT_S = 30.0
FRONT_NAME = "llmos.front"  # (front.FrontDoor's actor: named here, so status needs no FastAPI import)
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


def _actor(name: str) -> Any:
    import ray

    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _manager() -> Any:
    from llmos.cluster.manager import MANAGER_NAME

    return _actor(MANAGER_NAME)


def up(address: str, config: dict[str, Any], timeout: float = UP_TIMEOUT_S,
       prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Start (or join) the cluster's instances and its front door (`config`'s gateway
    section); each live node's row once all are ready and the front door serves.

    Raises:
        ConfigError: a cluster is already up with another config.  TimeoutError: a node's
        instance was not ready within `timeout` (the rows say why).  RuntimeError: the
        front door could not serve (its port is taken, ...).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from llmos.cluster.front import FrontDoor
    from llmos.cluster.manager import MANAGER_NAME, ClusterManager

    init_ray(address)
    # Each node's own gateway listens on a free port (nodes may share a machine); the front door on the one asked.
    nodes = {**config, "gateway": {**config["gateway"], "port": 0}}
    manager, front = _manager(), _actor(FRONT_NAME)
    started = manager is None
    if manager is not None:
        if not ray.get(manager.same_config.remote(nodes, prefix)) or (
                front is not None and not ray.get(front.same_config.remote(config["gateway"]))):
            raise ConfigError("a cluster is already up with another config: `llmos cluster down` first")
    else:
        if front is None:
            _check_port(config["gateway"])  # before anything starts: the front door listens on this node
        manager = ray.remote(ClusterManager).options(name=MANAGER_NAME, namespace=NAMESPACE, lifetime="detached",
                                                     num_cpus=0, max_concurrency=8,
                                                     get_if_exists=True).remote(nodes, prefix)
    try:
        deadline = time.monotonic() + timeout
        while True:
            rows: list[dict[str, Any]] = ray.get(manager.status.remote())
            if rows and all(row["ready"] for row in rows):
                break
            if time.monotonic() > deadline:
                why = "; ".join(f"{row['node_id'][:12]}: {row.get('why')}" for row in rows if not row["ready"])
                raise TimeoutError(f"not every node's instance was ready within {timeout:g} s ({why})")
            time.sleep(0.5)
        if front is None:  # on this node (softly: Ray moves it if the node goes)
            here = ray.get_runtime_context().get_node_id()
            front = ray.remote(FrontDoor).options(
                name=FRONT_NAME, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_restarts=-1,
                max_concurrency=4, get_if_exists=True,
                scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote(config["gateway"])
        try:
            ray.get(front.info.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.RayActorError as exc:  # its constructor failed: say why
            raise RuntimeError(_cause(exc)) from None
    except BaseException:
        if started:  # what this call started, it takes down: a failed up leaves nothing
            down(address)
        raise
    return rows


def _check_port(gateway: dict[str, Any]) -> None:
    host, port = gateway.get("host", "127.0.0.1"), gateway.get("port", 0)
    if port:
        try:
            socket.create_server((host, port)).close()
        except OSError as exc:
            raise ConfigError(f"the front door cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _cause(exc: BaseException) -> str:
    """The error an actor's constructor raised, from Ray's report of it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("RuntimeError: "):
            return line.removeprefix("RuntimeError: ")
    return lines[-1] if lines else type(exc).__name__


def down(address: str) -> int:
    """Stop every instance and the manager; how many instances stopped."""
    import ray

    init_ray(address)
    front = _actor(FRONT_NAME)
    if front is not None:
        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(front.stop.remote(), timeout=STATUS_TIMEOUT_S)
        ray.kill(front, no_restart=True)
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


def front_door(address: str) -> dict[str, Any] | None:
    """The front door's URL, node and instances; None when it is not up."""
    import ray

    init_ray(address)
    front = _actor(FRONT_NAME)
    return None if front is None else dict(ray.get(front.info.remote(), timeout=STATUS_TIMEOUT_S))


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
            rows = up(ns.address, msgspec.to_builtins(config), ns.timeout, ns.instance or DEFAULT_PREFIX)
            print(_table(rows))
            url = (front_door(ns.address) or {}).get("url")
            print(f"llmos cluster: {len(rows)} instance(s) ready; front door {url} "
                  f"(or libllm.cluster.connect({ns.address!r}))")
            return 0
        if ns.action == "down":
            print(f"llmos cluster: {down(ns.address)} instance(s) stopped")
            return 0
        rows = status(ns.address)
        front = front_door(ns.address)
        if ns.json:
            print(json.dumps({"front_door": front, "instances": rows}, indent=2))
        elif rows:
            print(_table(rows))
            print(f"front door: {front['url'] if front else 'not up'}")
            for name, why in (front or {}).get("refused", {}).items():
                print(f"not used: {name}: it {why}")
        else:
            print("llmos cluster: not up")
        return 0
    except (ConfigError, ValueError, TimeoutError, ConnectionError, RuntimeError) as exc:
        print(f"llmos: {exc}", file=sys.stderr)
        return 2
