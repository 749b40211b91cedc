"""Elastic dispatch on a multi-node cluster on this machine (ray.cluster_utils, fake GPUs): workers that do not
fit wait without holding the run back, nodes that join take shards, nodes that leave lose nothing,
`ray.workers: auto` follows the nodes, stage progress reaches Ray's metrics, a GPU that torch cannot see
fails the stage fast, and Ctrl-C stops a driver with one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from prism_ray import pipeline
from prism_ray.orchestration.workers import FAKE_GPUS_ENV
from prism_ray.stages.base import StageError
from prism_ray.storage import ShardStore
from tests.orchestration.conftest import add_gpu_node
from tests.orchestration.helpers import (autoscaler_request, check_exactly_once, recover_config, start_stage_thread,
                                         unit_nodes, wait_until, worker_actors)

pytestmark = pytest.mark.slow
PREFIX = "recover/prism"
REPO = Path(__file__).resolve().parents[2]


def _finish(thread, result, timeout: float = 300):
    thread.join(timeout=timeout)
    assert not thread.is_alive(), "the stage did not finish"
    if "error" in result:
        raise result["error"]
    return result["report"]


def _committed(store: ShardStore, n: int) -> int:
    return wait_until(lambda: len(store.committed()) >= n and len(store.committed()), what=f"{n} shards committed")


def test_more_workers_than_fit_finish_with_those_that_fit(ray_cluster, tmp_path):
    ray_cluster(gpu_nodes=1)  # room for one worker of 1 GPU
    cfg = recover_config(str(tmp_path / "run"), ipc=3, iterations=10,
                         ray={"workers": 3, "gpus_per_worker": 1, "cpus_per_worker": 0.5})
    stage, storage, thread, result = start_stage_thread(cfg)
    report = _finish(thread, result)
    assert report.complete and (report.ran, report.failed) == (6, {})
    assert report.workers_started == 3  # two of them never found room, and nobody waited for them
    (gpu_node,) = [n for n in ray.nodes() if n["Resources"].get("GPU")]
    assert set(unit_nodes(storage, PREFIX).values()) == {gpu_node["NodeID"]}
    assert worker_actors() == []  # the unplaced ones ended with the stage too
    check_exactly_once(storage, "prism", 6, 12)


def test_nodes_added_mid_run_take_shards(ray_cluster, tmp_path):
    c = ray_cluster(gpu_nodes=1)
    first = {n["NodeID"] for n in ray.nodes()}
    cfg = recover_config(str(tmp_path / "run"), ipc=12, iterations=80,
                         ray={"workers": 3, "gpus_per_worker": 1, "cpus_per_worker": 0.5})
    stage, storage, thread, result = start_stage_thread(cfg)
    _committed(stage.store, 1)
    added = {add_gpu_node(c).node_id, add_gpu_node(c).node_id}
    report = _finish(thread, result)
    assert report.complete and report.failed == {} and report.nodes_joined == 2
    nodes = unit_nodes(storage, PREFIX)
    assert sorted(nodes) == sorted(stage.store.committed())  # a record for every shard
    assert set(nodes.values()) & first and set(nodes.values()) & added  # on the first node and on the new ones
    check_exactly_once(storage, "prism", 24, 48)


def test_nodes_removed_twice_leave_every_shard_once(ray_cluster, tmp_path):
    c = ray_cluster(gpu_nodes=3)
    cfg = recover_config(str(tmp_path / "run"), ipc=10, iterations=80,
                         ray={"workers": 3, "gpus_per_worker": 1, "cpus_per_worker": 0.5, "max_attempts": 1})
    stage, storage, thread, result = start_stage_thread(cfg)
    for already in (2, 5):
        _committed(stage.store, already)
        busy = wait_until(lambda: {a.node_id for a in worker_actors()} & {n.node_id for n in c.worker_nodes},
                          what="a node with a worker")
        victim = next(n for n in c.worker_nodes if n.node_id in busy)
        c.remove_node(victim, allow_graceful=False)
    report = _finish(thread, result)
    # max_attempts 1: a shard that had counted its lost attempt would have failed
    assert report.complete and report.failed == {}
    assert report.nodes_left == 2 and report.workers_lost >= 2 and report.requeued >= 1
    # a shard whose manifest landed just before its worker was lost is found committed when handed out again
    assert report.ran + report.duplicates + report.already == 20
    check_exactly_once(storage, "prism", 20, 40)


def test_auto_workers_follow_the_nodes(ray_cluster, tmp_path):
    c = ray_cluster(gpu_nodes=1)
    cfg = recover_config(str(tmp_path / "run"), ipc=20, iterations=100,
                         ray={"workers": "auto", "max_workers": 3, "gpus_per_worker": 1, "cpus_per_worker": 0.5})
    stage, storage, thread, result = start_stage_thread(cfg)
    count = lambda n: lambda: len(worker_actors()) == n  # noqa: E731
    wait_until(count(1), what="one worker on the one GPU node")
    # room for ray.max_workers workers is asked of the autoscaler while the queue is long, and withdrawn at the end
    shape = (("CPU", 0.5), ("GPU", 1.0))
    wait_until(lambda: autoscaler_request() == {shape: 3}, what="a request for room for three workers")
    second = add_gpu_node(c)
    wait_until(count(2), what="a second worker on the node that joined")
    add_gpu_node(c)
    wait_until(count(3), what="a third worker on the next node")
    c.remove_node(second, allow_graceful=False)
    wait_until(count(2), what="two workers once a node left")
    report = _finish(thread, result)
    assert report.complete and report.failed == {}
    assert (report.nodes_joined, report.nodes_left) == (2, 1)
    assert report.workers_started >= 3 and report.workers_lost >= 1
    assert worker_actors() == []  # the queue drained: every worker ended
    assert autoscaler_request() == {}
    check_exactly_once(storage, "prism", 40, 80)


def _metric_values(name: str, stage: str) -> list[float]:
    """Values of Prometheus series `name` tagged with `stage`, from every node's metrics endpoint."""
    values = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        text = urllib.request.urlopen(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=5).read()
        for line in text.decode().splitlines():
            if line.startswith(name + "{") and f'stage="{stage}"' in line:
                values.append(float(line.rsplit(" ", 1)[1]))
    return values


METRICS = {"ray_prism_units_committed_total": [4.0], "ray_prism_images_committed_total": [8.0],
           "ray_prism_unit_seconds_count": [4.0], "ray_prism_units_in_flight": [0.0]}

# A driver of its own, as every `prism-ray` command is: Ray's metric recorder is process-wide state, and this
# test process has joined and left dozens of clusters before (once in CI its metrics never reached the agent).
# The driver stays until its metrics are on the endpoint (a driver's series may go with it) and prints them.
METRICS_DRIVER = """
import json, sys, time
import ray, yaml
from prism_ray.config_loader import config_from_dict
from tests.orchestration.helpers import start_stage_thread
from tests.orchestration.test_elastic import METRICS, PREFIX, _finish, _metric_values
ray.init(address=sys.argv[1], namespace="prism-ray", log_to_driver=False)
stage, storage, thread, result = start_stage_thread(config_from_dict(yaml.safe_load(open(sys.argv[2]))))
ran = _finish(thread, result).ran
deadline, seen = time.time() + 120, {}
while seen != METRICS and time.time() < deadline:
    # the latest value of each series: a gauge nobody sets again can leave the endpoint between two polls
    seen.update({name: v for name in METRICS if (v := _metric_values(name, PREFIX))})
    time.sleep(0.2)
print(json.dumps({"ran": ran, "metrics": seen}))
"""


def test_stage_progress_is_exported_as_ray_metrics(ray_cluster, tmp_path):
    c = ray_cluster(gpu_nodes=1)
    cfg = recover_config(str(tmp_path / "run"), ipc=2, iterations=5,
                         ray={"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 0.5})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    driver = subprocess.run([sys.executable, "-c", METRICS_DRIVER, c.address, str(cfg_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    out = json.loads(driver.stdout.strip().splitlines()[-1])
    assert out["ran"] == 4
    assert out["metrics"] == METRICS  # what the head's Prometheus endpoint showed for the stage


def test_reserved_gpu_that_torch_cannot_see_fails_fast(ray_cluster, tmp_path, monkeypatch):
    ray_cluster(gpu_nodes=1)
    monkeypatch.delenv(FAKE_GPUS_ENV)  # this node's GPU is a Ray resource only: torch sees no CUDA device
    cfg = recover_config(str(tmp_path / "run"), ipc=2, iterations=5,
                         ray={"workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 0.5})
    stage, storage, thread, result = start_stage_thread(cfg)
    thread.join(timeout=120)
    error = result["error"]
    assert isinstance(error, StageError)
    text = str(error)
    assert "\n" not in text and "a worker could not start on node 127.0.0.1" in text
    assert "reserved 1 GPU" in text and "torch" in text and "sees no CUDA device" in text
    log_uri = text.rsplit("(traceback: ", 1)[1].rstrip(")")
    assert log_uri == storage.uri(f"{PREFIX}/logs/worker-start.txt")
    log = storage.read_bytes(f"{PREFIX}/logs/worker-start.txt").decode()
    assert "Traceback (most recent call last)" in log and "require_gpu" in log
    assert stage.store.committed() == set() and worker_actors() == []


def test_ctrl_c_stops_the_driver_with_one_line_and_a_rerun_finishes(ray_cluster, tmp_path):
    c = ray_cluster(gpu_nodes=2)
    cfg = recover_config(str(tmp_path / "run"), ipc=10, iterations=120,
                         ray={"workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 0.5, "address": c.address})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    cmd = [sys.executable, "-m", "prism_ray", "recover", str(cfg_path), "--json"]
    store = ShardStore(pipeline.open_storage(cfg), PREFIX)
    driver = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        _committed(store, 2)
    finally:
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("prism-ray: stopped by SIGINT during recover/prism: ") and "of 20 shards committed" in last
    assert "rerun the same command" in last and "Traceback" not in err
    wait_until(lambda: not worker_actors(), what="the driver's workers ending")
    before = len(store.committed())

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    (report,) = json.loads(rerun.stdout)
    assert (report["skipped"], report["ran"], report["duplicates"]) == (before, 20 - before, 0)
    check_exactly_once(pipeline.open_storage(cfg), "prism", 20, 40)
