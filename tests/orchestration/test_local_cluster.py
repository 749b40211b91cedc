"""Jobs on the local multi-node cluster of `cluster/local.sh` (head + two worker nodes on 127.0.0.1, token auth),
submitted with the `ray job submit` line the script prints: a run that succeeds on both worker nodes, a config
error that fails the job with one line, and `ray job stop` that ends the driver cleanly so a rerun finishes."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from prism_ray.storage import ShardStore, Storage
from tests.conftest import free_port
from tests.orchestration.helpers import check_exactly_once, recover_config, unit_nodes, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local.sh"
PREFIX = "recover/prism"


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """The cluster `cluster/local.sh up` starts; `down` at the end, also when a test fails."""
    if ray.is_initialized():
        ray.shutdown()
    state = tmp_path_factory.mktemp("local-cluster")
    env = {**os.environ, "PRISM_LOCAL_CLUSTER": str(state), "GCS_PORT": str(free_port()),
           "DASHBOARD_PORT": str(free_port()), "METRICS_PORT": str(free_port()),
           "RAY": str(Path(sys.executable).parent / "ray")}
    # this process's loopback setting would stop the script's worker nodes from joining: it sets its own
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    pids = []
    try:
        up = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=300)
        pids = [int(p.read_text()) for p in state.glob("*.pid")]
        assert up.returncode == 0, up.stdout + up.stderr + "".join(p.read_text()[-2000:] for p in state.glob("*.log"))
        (line,) = [x for x in up.stdout.splitlines() if " job submit " in x]
        words = shlex.split(line)
        client_env = dict(w.split("=", 1) for w in words[:2])  # RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=...
        submit = words[2:words.index("--") + 1]  # ray job submit --address URL --working-dir REPO --
        yield {"env": {**os.environ, **client_env}, "submit": submit, "address": submit[submit.index("--address") + 1],
               "metrics": f"http://127.0.0.1:{env['METRICS_PORT']}/metrics", "pids": pids, "up": up.stdout}
    finally:
        down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
        assert pids == [] or f"({len(pids)} node(s) stopped)" in down.stdout, down.stdout
        for pid in pids:  # exactly the processes it started are gone
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        # the nodes' Ray temp folders (logs), named by the script after its state folder
        checksum = subprocess.run(["cksum"], input=str(state), capture_output=True, text=True).stdout.split()[0]
        shutil.rmtree(f"/tmp/prism-ray-local-{checksum}", ignore_errors=True)


def _config(tmp_path, **kwargs) -> Path:
    cfg = recover_config(str(tmp_path / "run"), **kwargs)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _submit(cluster, *args, timeout=600):
    """`ray job submit` (the script's line) of `python -m prism_ray ARGS`, waiting for the job to end."""
    return subprocess.run([*cluster["submit"], sys.executable, "-m", "prism_ray", *args], env=cluster["env"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _ray(cluster, *args, timeout=120):
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=cluster["env"], capture_output=True,
                          text=True, timeout=timeout)


def _json_reports(output: str) -> list[dict]:
    """The stage reports a `--json` run printed, out of the job's log."""
    start = output.index('[\n  {\n    "stage"')
    return json.loads(output[start:output.index("\n]", start) + 2])


def test_script_prints_the_submit_line(local_cluster):
    assert local_cluster["submit"][:3] == [str(Path(sys.executable).parent / "ray"), "job", "submit"]
    assert "--working-dir" in local_cluster["submit"] and len(local_cluster["pids"]) == 3
    assert "token auth on" in local_cluster["up"] and "cluster/local.sh down" in local_cluster["up"]


def test_job_runs_on_both_worker_nodes(local_cluster, tmp_path):
    cfg = _config(tmp_path, ipc=4, iterations=20, ray={"workers": 2, "cpus_per_worker": 1})
    done = _submit(local_cluster, "recover", str(cfg), "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    (report,) = _json_reports(done.stdout)
    assert (report["ran"], report["failed"]) == (8, {})
    storage = Storage(str(tmp_path / "run"))
    check_exactly_once(storage, "prism", 8, 16)
    assert len(set(unit_nodes(storage, PREFIX).values())) == 2  # the head has no CPUs: one worker per node
    from prism_ray.storage import RECORDS
    records = ShardStore(storage, PREFIX).key(RECORDS)
    ips = {storage.read_json(k)["node_ip"] for k in storage.list(records, suffix=".json")}
    assert ips == {"127.0.0.1"}  # the address the nodes were started with, not the machine's interface


def test_invalid_config_fails_the_job_with_one_line(local_cluster, tmp_path):
    cfg = _config(tmp_path, ipc=1)
    done = _submit(local_cluster, "recover", str(cfg), "--set", "recover.lr=-1")
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "failed" in out.lower()
    assert "prism-ray: error: recover.lr: got -1.0; allowed: > 0" in out
    assert "Traceback" not in out
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _metric(url: str, name: str, stage: str) -> float | None:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") and f'stage="{stage}"' in line]
    return max(values) if values else None


def test_job_stop_ends_the_driver_cleanly_and_a_rerun_finishes(local_cluster, tmp_path):
    cfg = _config(tmp_path, ipc=16, iterations=150, ray={"workers": 2, "cpus_per_worker": 1})
    store = ShardStore(Storage(str(tmp_path / "run")), PREFIX)
    submit = [*local_cluster["submit"][:-1], "--no-wait", "--", sys.executable, "-m", "prism_ray", "recover",
              str(cfg), "--json"]
    sent = subprocess.run(submit, env=local_cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert sent.returncode == 0, sent.stderr
    job_id = re.search(r"Job '([^']+)' submitted successfully", sent.stdout + sent.stderr).group(1)
    wait_until(lambda: len(store.committed()) >= 2, timeout=300, what="two shards committed by the job")
    # the driver's progress is on the head's Prometheus endpoint while the job runs
    committed = wait_until(lambda: _metric(local_cluster["metrics"], "ray_prism_units_committed_total", PREFIX),
                           what="ray_prism_units_committed_total on the head's metrics endpoint")
    assert committed >= 1

    stop = _ray(local_cluster, "job", "stop", "--address", local_cluster["address"], job_id, timeout=300)
    assert stop.returncode == 0, stop.stderr
    status = _ray(local_cluster, "job", "status", "--address", local_cluster["address"], job_id)
    assert "was stopped" in status.stdout + status.stderr
    logs = _ray(local_cluster, "job", "logs", "--address", local_cluster["address"], job_id).stdout
    (line,) = [x for x in logs.splitlines() if x.startswith("prism-ray: stopped by SIGTERM")]
    assert "during recover/prism: " in line and "of 32 shards committed" in line and "rerun the same command" in line
    assert "SIGTERM received" not in logs and "Traceback" not in logs
    # its workers ended with it; nothing commits behind the rerun's back
    wait_until(lambda: "StageActor" not in _ray(local_cluster, "list", "actors", "--address", local_cluster["address"],
                                                "--filter", "state=ALIVE").stdout, what="the job's workers ending")
    before = len(store.committed())
    assert before < 32

    done = _submit(local_cluster, "recover", str(cfg), "--json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (report,) = _json_reports(done.stdout)
    assert (report["skipped"], report["ran"], report["duplicates"]) == (before, 32 - before, 0)
    check_exactly_once(store.storage, "prism", 32, 64)
