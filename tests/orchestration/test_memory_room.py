"""A stage refuses to start when connected nodes of the worker's shape cannot hold one worker's memory."""
from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from prism_ray import pipeline
from prism_ray.memory import for_stage, worker_memory
from prism_ray.orchestration.dispatch import check_room
from prism_ray.stages.base import StageError
from tests.orchestration.helpers import pipeline_config

pytestmark = pytest.mark.slow


@pytest.fixture
def small_node():
    """One node with 2 CPUs and 300 MB of memory for Ray's scheduler."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "memory": 300 * 2**20,
                                                      "node_ip_address": "127.0.0.1", "include_dashboard": False})
    ray.init(address=c.address, namespace="prism-ray", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def stages_of(cfg):
    storage = pipeline.open_storage(cfg)
    context = pipeline.data_context(cfg, write=False)
    return pipeline.build_stages(cfg, storage, context, ["recover", "relabel", "evaluate"])


def test_estimates_exist_for_every_heavy_worker(tmp_path):
    cfg = pipeline_config(str(tmp_path / "run"))
    kinds = {w.kind: w for w in worker_memory(cfg, 4, ["squeeze", "recover", "relabel", "evaluate"])}
    assert {"recover", "relabel", "student", "diversity"} <= set(kinds)
    assert all(w.host > 2**29 and w.gpu == 0 for w in kinds.values())  # a CPU worker: all of it in host memory


def test_refused_when_no_node_has_the_memory(small_node, tmp_path):
    cfg = pipeline_config(str(tmp_path / "run"))
    heavy = [s for s in stages_of(cfg) if s.worker_kind]
    assert heavy
    for stage in heavy:
        need = for_stage(cfg, 4, stage.worker_kind)
        with pytest.raises(StageError, match="no node can hold one worker") as info:
            check_room(stage, cfg.ray)
        assert "127.0.0.1 314.6 MB" in str(info.value) and need.holds in str(info.value)


def test_memory_per_worker_states_the_need(small_node, tmp_path):
    cfg = pipeline_config(str(tmp_path / "run"), ray={"memory_per_worker": 0.25})  # 268 MB: fits in 315 MB
    for stage in stages_of(cfg):
        check_room(stage, cfg.ray)


def test_no_node_of_the_shape_yet_waits_for_one(small_node, tmp_path):
    cfg = pipeline_config(str(tmp_path / "run"), ray={"gpus_per_worker": 1})  # no GPU node: an autoscaler may add
    for stage in stages_of(cfg):
        check_room(stage, cfg.ray)
