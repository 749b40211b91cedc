"""`ray.workers: auto` against Ray's own autoscaler (v2), with the fake multi-node provider that
`ray.cluster_utils.AutoscalingCluster` uses: a head with no CPUs, worker node types that start at zero. The run's
pending demand (`request_resources`) makes the autoscaler launch nodes, the stage's workers start on them as they
join, every unit commits once, and once the stage is over the request is withdrawn and the nodes scale down.
With a CPU type and a type with a GPU (a Ray resource only: no CUDA here), GPU workers bring up only GPU nodes.

Not `AutoscalingCluster` itself: the Ray 2.60 wheel does not ship the file it and the `fake_multinode` provider
type read their defaults from (fake_multi_node/example.yaml: the autoscaler's monitor dies on it), its start and
shutdown run `ray stop --force` (every Ray on the machine), and it binds the head to the machine's interface
address. The fixture below starts the same head (`ray start --head --autoscaling-config=...` with
RAY_FAKE_CLUSTER and autoscaler v2 switched on) on 127.0.0.1, with the same provider class loaded as an
`external` provider, in a session of its own that is killed at the end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import ray

from prism_ray.orchestration.dispatch import run_stage_ray
from prism_ray.storage import Storage
from tests.conftest import free_port
from tests.orchestration.helpers import (autoscaler_request, check_exactly_once, kill_session, planned_stage,
                                         recover_config, sleep_stage, unit_nodes, wait_until)

pytestmark = pytest.mark.slow
IDLE_MINUTES = 0.05  # a worker node without work goes after 3 s


def _launcher_config(port: int, worker_types: dict) -> dict:
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    return {
        "cluster_name": "prism-autoscaling-test", "max_workers": 4, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_MINUTES,
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID,
                     "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                                 **worker_types},
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _driver_auth() -> dict:
    """The head's token settings, matching what this process will present. A local `ray.init()` earlier in the
    same process (another test module) sets RAY_AUTH_MODE=token in os.environ and keeps its token in
    ~/.ray/auth_token; the head, whose HOME is a fresh folder, would then start with auth on and no token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        with open(path) as f:
            token = f.read().strip()
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


@pytest.fixture
def autoscaling_cluster(tmp_path_factory):
    """start(worker_types): the head (0 CPUs, autoscaler v2, fake multi-node provider) on 127.0.0.1, this process
    connected as the driver; everything it started is killed at the end."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    heads = []

    def start(worker_types: dict):
        if ray.is_initialized():
            ray.shutdown()
        state = tmp_path_factory.mktemp("autoscaling")
        port = free_port()
        config = state / "cluster.json"
        config.write_text(json.dumps(_launcher_config(port, worker_types)))
        home = state / "home"
        home.mkdir()
        env = {**os.environ, "HOME": str(home), "RAY_FAKE_CLUSTER": "1", "RAY_enable_autoscaler_v2": "1",
               "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
               "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               # the monitor starts the fake nodes in its own process: this keeps them on 127.0.0.1 too
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        env.pop("RAY_ADDRESS", None)
        env.update(_driver_auth())
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")  # this environment's ray
        head = subprocess.Popen(
            [ray_cli, "start", "--head", "--block", f"--autoscaling-config={config}", "--node-ip-address=127.0.0.1",
             f"--port={port}", "--num-cpus=0", "--num-gpus=0", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", "--disable-usage-stats",
             f"--temp-dir=/tmp/prism-as-{port}"],
            env=env, stdout=(state / "head.log").open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        heads.append((head, f"/tmp/prism-as-{port}"))
        deadline = time.time() + 120
        while True:
            try:
                ray.init(address=f"127.0.0.1:{port}", namespace="prism-ray", log_to_driver=False)
                break
            except Exception:  # noqa: BLE001 - the head is still coming up
                if time.time() > deadline or head.poll() is not None:
                    raise AssertionError("the autoscaling head did not come up: " + (state / "head.log").read_text())
                time.sleep(1)
        return port

    try:
        yield start
    finally:
        ray.shutdown()
        for head, temp in heads:
            head.terminate()
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            kill_session(head.pid)  # the fake nodes the monitor started, and anything else of that head
            subprocess.run(["rm", "-rf", temp])


class NodeCount:
    """Samples the number of live worker nodes (not the head) every half second while a stage runs."""

    def __init__(self):
        self.samples: list[tuple[float, int, tuple]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> list[dict]:
        return [n for n in ray.nodes() if n["Alive"] and not n["Resources"].get("node:__internal_head__")]

    def _sample(self):
        nodes = self.now()
        self.samples.append((time.time(), len(nodes), tuple(sorted(n["Resources"].get("GPU", 0) for n in nodes))))

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.5)

    def stop(self):
        """Stop sampling, with one last sample of how things stand now."""
        self._stop.set()
        self._thread.join()
        self._sample()


def test_auto_workers_bring_up_nodes_use_them_and_let_them_go(autoscaling_cluster, tmp_path):
    autoscaling_cluster({"cpu_worker": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0,
                                        "max_workers": 2}})
    counter = NodeCount()
    assert counter.now() == []  # nothing but the head, which takes no work
    cfg = recover_config(str(tmp_path / "run"), ipc=4, classes=2, group=1, iterations=5,
                         ray={"workers": "auto", "max_workers": 2, "cpus_per_worker": 1})
    stage, storage = planned_stage(cfg)
    started = time.time()
    report = run_stage_ray(stage, cfg.ray, quiet=True)
    ended = time.time()
    assert report.complete and (report.ran, report.failed) == (8, {})
    assert report.nodes_joined >= 1 and report.workers_started >= 1
    check_exactly_once(storage, "prism", 8, 8)
    # every unit ran on a node the autoscaler launched (the head takes no work)
    launched = {n["NodeID"] for n in ray.nodes() if not n["Resources"].get("node:__internal_head__")}
    assert set(unit_nodes(storage, stage.prefix).values()) <= launched
    assert autoscaler_request() == {}  # withdrawn at the end of the stage
    wait_until(lambda: counter.now() == [], timeout=120, what="the idle nodes scaling down")
    counter.stop()
    during = [n for t, n, _ in counter.samples if started <= t <= ended]
    # up from zero, to the two workers' worth asked for (ray.max_workers), and back to zero once the stage ended
    assert during[0] == 0 and max(during) >= 1 and max(n for _, n, _ in counter.samples) == 2
    assert counter.samples[-1][1] == 0


def test_gpu_workers_bring_up_gpu_nodes_only(autoscaling_cluster, tmp_path):
    autoscaling_cluster({"cpu_worker": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0,
                                        "max_workers": 2},
                         "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                                        "max_workers": 2}})
    counter = NodeCount()
    cfg = recover_config(str(tmp_path / "run"), ray={"workers": "auto", "max_workers": 2, "gpus_per_worker": 1,
                                                      "cpus_per_worker": 1})
    storage = Storage(str(tmp_path / "run"))
    stage = sleep_stage(cfg, storage, [2.0] * 6)
    report = run_stage_ray(stage, cfg.ray, quiet=True)
    assert report.complete and report.ran == 6 and report.nodes_joined >= 1
    assert sorted(stage.store.committed()) == [u.id for u in stage.units()]
    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}
    assert gpu_nodes and set(unit_nodes(storage, stage.prefix).values()) <= gpu_nodes
    wait_until(lambda: counter.now() == [], timeout=120, what="the idle GPU nodes scaling down")
    counter.stop()
    # no CPU-only node was ever launched for GPU workers
    assert {gpus for _, _, kinds in counter.samples for gpus in kinds} == {1.0}
