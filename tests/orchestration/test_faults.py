"""Faults on a multi-node cluster on this machine: a worker killed mid-shard, a node removed mid-run,
and the driver itself killed with SIGKILL. Every shard must end up committed exactly once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster

from prism_ray import pipeline
from prism_ray.orchestration.dispatch import run_stage_ray
from prism_ray.storage import ShardStore
from tests.orchestration.helpers import (check_exactly_once, planned_stage, recover_config, wait_until,
                                         worker_actors)

pytestmark = pytest.mark.slow

FAST_FAILURE_DETECTION = {"health_check_period_ms": 200, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def _module_cluster():
    """Head (no GPU) plus three nodes with one fake GPU each, all on loopback; this process is a driver. One for
    the module: a four-node cluster costs ~9 CPU-seconds to start and stop here."""
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False,
                                                      "_system_config": FAST_FAILURE_DETECTION})
    ray.init(address=c.address, namespace="prism-ray", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def cluster(_module_cluster):
    """The module's cluster as each test expects it: three GPU nodes (one replaces a node an earlier test
    removed) and no stage worker of an earlier test alive."""
    c = _module_cluster
    wait_until(lambda: not worker_actors(), what="an earlier test's workers ending")
    while len(c.worker_nodes) < 3:
        c.add_node(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    wait_until(lambda: sum(n["Alive"] for n in ray.nodes()) == 4, what="four live nodes")
    return c, list(c.worker_nodes)


def _start_stage(cfg):
    stage, storage = planned_stage(cfg, record_plan=False)
    result = {}

    def drive():
        result["report"] = run_stage_ray(stage, cfg.ray, quiet=True)

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    return stage, storage, thread, result


def _wait_committed(store: ShardStore, n: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = len(store.committed())
        if done >= n:
            return done
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} shards committed after {timeout} s")


def _kill_driver_after(cmd: list[str], store: ShardStore, committed: int) -> int:
    """Start the driver, SIGKILL it once `committed` units are in, wait until Ray has ended its actors
    (so nothing commits behind the test's back); return how many units were committed then."""
    driver = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait_committed(store, committed)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.time() + 60
    while worker_actors() and time.time() < deadline:
        time.sleep(0.2)
    assert not worker_actors()
    # Ray reports an actor dead before its process is gone: a commit already under way may still land. Count
    # once the count has held still for 3 s.
    count, since = len(store.committed()), time.time()
    while time.time() - since < 3 and time.time() < deadline + 30:
        time.sleep(0.2)
        now = len(store.committed())
        if now != count:
            count, since = now, time.time()
    return count


def test_killed_worker_actor(cluster, tmp_path):
    cfg = recover_config(str(tmp_path / "run"), ipc=8, iterations=120, workers=3,
                         ray={"workers": 3, "gpus_per_worker": 1, "cpus_per_worker": 0.5, "max_attempts": 1})
    stage, storage, thread, result = _start_stage(cfg)
    _wait_committed(stage.store, 2)
    victim = worker_actors()[0]
    ray.kill(ray.get_actor(victim.name, namespace="prism-ray"), no_restart=True)
    thread.join(timeout=300)
    report = result["report"]
    # max_attempts 1: the lost shards were requeued, not counted as failed attempts
    assert report.complete and report.failed == {} and report.workers_lost >= 1
    # a shard whose manifest landed just before its worker was lost is found committed when handed out again
    assert report.ran + report.duplicates + report.already == 16
    check_exactly_once(storage, "prism", 16, 32)


def test_removed_node(cluster, tmp_path):
    c, nodes = cluster
    cfg = recover_config(str(tmp_path / "run"), ipc=8, iterations=120, workers=3,
                         ray={"workers": 3, "gpus_per_worker": 0.5, "cpus_per_worker": 0.25})
    stage, storage, thread, result = _start_stage(cfg)
    _wait_committed(stage.store, 2)
    busy = {a.node_id for a in worker_actors()}
    victim = next(n for n in nodes if n.node_id in busy)
    c.remove_node(victim, allow_graceful=False)
    thread.join(timeout=300)
    report = result["report"]
    assert report.complete and report.failed == {} and report.workers_lost >= 1
    # a shard whose manifest landed just before its worker was lost is found committed when handed out again
    assert report.ran + report.duplicates + report.already == 16
    check_exactly_once(storage, "prism", 16, 32)
    # the node really went away, and the run finished on the nodes that are left
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert victim.node_id not in alive and len(alive) == 3


def test_driver_killed_then_rerun(cluster, tmp_path):
    c, _ = cluster
    out = str(tmp_path / "run")
    cfg = recover_config(out, ipc=10, iterations=120, workers=3,
                         ray={"workers": 3, "gpus_per_worker": 1, "cpus_per_worker": 0.5, "address": c.address})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "prism_ray", "recover", str(cfg_path), "--json"]
    store = ShardStore(pipeline.open_storage(cfg), "recover/prism")
    before = _kill_driver_after(cmd, store, 3)
    assert 3 <= before < 20

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    (report,) = json.loads(rerun.stdout)
    assert report["skipped"] == before
    assert report["ran"] == 20 - before  # only the shards that were not committed ran
    assert report["duplicates"] == 0
    check_exactly_once(pipeline.open_storage(cfg), "prism", 20, 40)


def _prepare_images(cfg):
    """Recover the image sets in this process (connected to the cluster): what relabel/evaluate read."""
    (recover, random_real) = pipeline.execute(cfg, ["recover"], quiet=True)
    assert recover.complete and random_real.complete


def test_relabel_driver_killed_then_rerun(cluster, tmp_path):
    from tests.orchestration.helpers import pipeline_config
    c, _ = cluster
    cfg = pipeline_config(str(tmp_path / "run"), relabel={"mode": "stored", "mix_group": 4, "epochs_per_shard": 1},
                          evaluate={"epochs": 40, "batch_size": 8},
                          ray={"workers": 3, "gpus_per_worker": 1, "cpus_per_worker": 0.5, "address": c.address})
    _prepare_images(cfg)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "prism_ray", "relabel", str(cfg_path), "--json"]
    store = ShardStore(pipeline.open_storage(cfg), "relabel")
    before = _kill_driver_after(cmd, store, 8)
    assert 8 <= before < 80
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    (report,) = json.loads(rerun.stdout)
    assert (report["skipped"], report["ran"], report["duplicates"]) == (before, 80 - before, 0)
    assert len(store.committed()) == 80 and all(store.verify(s) == [] for s in store.committed())


def test_evaluation_actor_killed_resumes_from_checkpoint(cluster, tmp_path):
    from prism_ray.stages.evaluate import STUDENTS_PREFIX, Checkpoints, StudentStage
    from tests.orchestration.helpers import pipeline_config
    cfg = pipeline_config(str(tmp_path / "run"), relabel={"mode": "live", "mix_group": 4},
                          evaluate={"epochs": 400, "batch_size": 8, "seeds": [0], "checkpoint_every": 10},
                          baselines={"random_real": False},
                          ray={"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 1})
    pipeline.execute(cfg, ["recover"], quiet=True)
    storage = pipeline.open_storage(cfg)
    context = pipeline.data_context(cfg)
    stage = StudentStage(cfg, storage, context)
    stage.prepare()
    stage.bind()
    (unit,) = stage.units()
    checkpoints = Checkpoints(stage.store, unit, stage.lineage_digest)
    result = {}
    thread = threading.Thread(target=lambda: result.update(report=run_stage_ray(stage, cfg.ray, quiet=True)),
                              daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not storage.exists(checkpoints.pointer) and time.time() < deadline:
        time.sleep(0.05)
    saved_epoch = checkpoints.load()["epoch"]  # verified against its sha256, loaded with weights_only
    (victim,) = worker_actors()
    ray.kill(ray.get_actor(victim.name, namespace="prism-ray"), no_restart=True)
    thread.join(timeout=600)
    report = result["report"]
    assert report.complete and report.workers_lost == 1
    (row,) = ShardStore(storage, f"{STUDENTS_PREFIX}").read_combined().to_pylist()
    assert row["resumed_from_epoch"] >= saved_epoch >= 10  # from its checkpoint, not from epoch 0
    assert row["epochs"] == 400
    assert not storage.exists(checkpoints.pointer)  # the commit cleared it
    assert not storage.fs.find(storage.path(stage.store.key("checkpoints")))
    # scored after epochs 1, 11, ..., 391 and 400, once each: the scores before the kill came back with the
    # checkpoint, those between the checkpoint and the kill were made again
    assert row["scored_epochs"] == 41 and row["best_top1"] >= row["top1"]
