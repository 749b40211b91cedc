"""Fixtures of the orchestration tests: multi-node Ray clusters on this machine (all on 127.0.0.1)."""
from __future__ import annotations

import os

import pytest
import ray

# Nodes of ray.cluster_utils.Cluster have GPUs that are Ray resources only: the driver must not ask workers to
# find a CUDA device there (tests of that check unset it).
os.environ.setdefault("PRISM_RAY_FAKE_GPUS", "1")

# Node deaths noticed in about a second (instead of 30 s), and metrics exported every second.
FAST_SYSTEM_CONFIG = {"health_check_period_ms": 200, "health_check_failure_threshold": 3,
                      "metrics_report_interval_ms": 1000}


@pytest.fixture
def ray_cluster():
    """`start(gpu_nodes)`: a head with one CPU and no GPU plus `gpu_nodes` nodes with one CPU and one (fake) GPU
    each, this process connected as the driver; shut down after the test, also when it fails."""
    from ray.cluster_utils import Cluster

    started = []

    def start(gpu_nodes: int = 1):
        if ray.is_initialized():
            ray.shutdown()
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                          "include_dashboard": False,
                                                          "_system_config": FAST_SYSTEM_CONFIG})
        started.append(c)
        for _ in range(gpu_nodes):
            add_gpu_node(c)
        c.wait_for_nodes()
        ray.init(address=c.address, namespace="prism-ray", log_to_driver=False)
        return c

    try:
        yield start
    finally:
        ray.shutdown()
        for c in started:
            c.shutdown()


def add_gpu_node(c):
    return c.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
