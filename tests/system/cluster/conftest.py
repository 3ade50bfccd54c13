"""One two-node Ray test cluster (ray.cluster_utils.Cluster: several raylets on this machine,
each its own node) with an llmos instance per node and the front door, shared by the tests
of this package: libllm.cluster's (test_libllm_cluster.py) and the HTTP front door's
(test_front_door.py). Tests that kill a node's processes wait for it to be back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import msgspec
import pytest

from llmos.config import load_config
from tests.conftest import unique_instance

WAIT = 120.0
KEYS = {"key-a": "tenant-a", "key-b": "tenant-b"}  # the front door's API keys


class Running:
    def __init__(self, ray_cluster: Any, prefix: str, rows: list[dict[str, Any]], session: Any, url: str) -> None:
        self.ray_cluster = ray_cluster
        self.prefix = prefix
        self.rows = rows  # each node's instance (`llmos cluster status`), as of the last kill
        self.session = session  # a libllm.cluster.ClusterSession of this test process
        self.url = url  # the front door's


@pytest.fixture(scope="package")
def running() -> Iterator[Running]:
    ray = pytest.importorskip("ray")  # (the test modules skip first without it: the `ray` extra)
    from ray.cluster_utils import Cluster

    from llmos.cluster import commands
    from llmos.libllm import cluster

    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray_cluster.add_node(num_cpus=1)
    prefix = unique_instance("cluster")
    try:
        ray.init(address=ray_cluster.address, namespace=cluster.NAMESPACE, log_to_driver=False)
        config = load_config(None)
        config = replace(config, gateway=replace(config.gateway, port=0, api_keys=KEYS),
                         scheduler=replace(config.scheduler, decode_steps=2))
        rows = commands.up(ray_cluster.address, msgspec.to_builtins(config), WAIT, prefix)
        door = commands.front_door(ray_cluster.address)
        assert door is not None
        yield Running(ray_cluster, prefix, rows, cluster.connect(ray_cluster.address, timeout=WAIT), door["url"])
    finally:
        try:
            commands.down(ray_cluster.address)
        finally:
            ray.shutdown()
            ray_cluster.shutdown()
