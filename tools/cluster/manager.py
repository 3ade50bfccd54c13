"""ClusterManager: the detached Ray actor that keeps one NodeInstance on every live node.

Runs anywhere in the Ray cluster (it asks for no CPU). Every RECONCILE_S it compares the
cluster's live nodes with its instances: a node that joined gets an actor pinned to it (hard
node affinity), a node that left has its actor killed. A NodeInstance that crashes is
restarted by Ray on its node (max_restarts), so the manager only follows nodes.
"""

from __future__ import annotations

import threading
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llmos.cluster.node import NodeInstance
from llmos.libllm.cluster import ACTOR_PREFIX, NAMESPACE

MANAGER_NAME = "llmos.manager"
RECONCILE_S = 1.0
MAX_CONCURRENT_REQUESTS = 1024  # per node actor (an async actor: each open request is one coroutine)


class ClusterManager:
    def __init__(self, config: dict[str, Any], prefix: str) -> None:
        self.config = config
        self.prefix = prefix  # each node's instance is named prefix-<its node id>
        self.nodes: dict[str, Any] = {}  # Ray node id -> its NodeInstance actor
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.reconcile()
        self._thread = threading.Thread(target=self._loop, name="llmos-reconcile", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(RECONCILE_S):
            self.reconcile()

    def reconcile(self) -> None:
        """One pass: start an instance on each live node without one, drop those of dead nodes."""
        with self._lock:
            if self._stop.is_set():
                return
            live = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}  # type: ignore[no-untyped-call]
            for node_id in set(self.nodes) - live:
                ray.kill(self.nodes.pop(node_id), no_restart=True)
            for node_id in sorted(live - set(self.nodes)):
                actor = ray.remote(NodeInstance).options(
                    name=ACTOR_PREFIX + node_id, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                    max_restarts=-1, max_concurrency=MAX_CONCURRENT_REQUESTS,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                self.nodes[node_id] = actor.remote(node_id, self.config, self.prefix)

    def same_config(self, config: dict[str, Any], prefix: str) -> bool:
        return config == self.config and prefix == self.prefix

    def status(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Each node's instance: who it is and its scheduler's figures (or why it cannot say)."""
        with self._lock:
            nodes = dict(self.nodes)
        refs = {node_id: (actor.info.remote(), actor.stats.remote()) for node_id, actor in nodes.items()}
        rows = []
        for node_id, (info_ref, stats_ref) in refs.items():
            try:
                info, stats = ray.get([info_ref, stats_ref], timeout=timeout)
                rows.append({**info, "ready": True, "stats": stats})
            except Exception as exc:  # starting, restarting, or its node is going: say so
                rows.append({"node_id": node_id, "ready": False, "why": f"{type(exc).__name__}: {exc}"[:200]})
        return rows

    def stop(self, timeout: float = 60.0) -> int:
        """Take every node's instance down, then the actors; the manager is killed after."""
        self._stop.set()
        with self._lock:
            nodes, self.nodes = dict(self.nodes), {}
        refs = [actor.stop.remote() for actor in nodes.values()]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for actor in nodes.values():
            ray.kill(actor, no_restart=True)
        return len(ready)

