"""Jobs on the local multi-node cluster of `cluster/local.sh` (head + two worker nodes on 127.0.0.1, token auth),
submitted with the `ray job submit` line the script prints, from a shell without this project's environment
(`python` in the line is the nodes'): the line run as printed, a run that succeeds on both worker nodes, a config
error that fails the job with one line, and `ray job stop` that ends the driver cleanly so a rerun finishes. And
`down` stops a node that does not stop by itself, with every process it started."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from prism_ray.storage import ShardStore, Storage
from tests.conftest import free_port
from tests.orchestration.helpers import (check_exactly_once, kill_session, recover_config, session_processes,
                                         unit_nodes, wait_until)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local.sh"
PREFIX = "recover/prism"
# A shell with nothing of this project's environment: no venv on PATH (and no `python` at all on this machine)
BARE_PATH = "/usr/bin:/bin"


def _script_env(state: Path) -> dict:
    env = {**os.environ, "PRISM_LOCAL_CLUSTER": str(state), "GCS_PORT": str(free_port()),
           "DASHBOARD_PORT": str(free_port()), "METRICS_PORT": str(free_port()),
           "RAY": str(Path(sys.executable).parent / "ray"), "PATH": BARE_PATH}
    # this process's loopback setting would stop the script's worker nodes from joining: it sets its own
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    return env


def test_down_kills_a_node_that_does_not_stop_with_all_it_started(tmp_path):
    """A node whose `ray start` ignores SIGTERM (stopped here with SIGSTOP) is killed after STOP_SECONDS with its
    whole session: GCS, raylet, dashboard, not `ray start` alone."""
    if ray.is_initialized():
        ray.shutdown()
    env = {**_script_env(tmp_path / "state"), "WORKERS": "0", "STOP_SECONDS": "2"}
    up = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=300)
    head = int((tmp_path / "state" / "head.pid").read_text())
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        started = session_processes(head)
        assert len(started) >= 3  # ray start, gcs_server, raylet, ...
        os.kill(head, signal.SIGSTOP)  # SIGTERM now waits: `ray start` cannot end its processes
        down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0 and "(1 node(s) stopped)" in down.stdout, down.stdout + down.stderr
        wait_until(lambda: session_processes(head) == [], timeout=30, what="every process of the node's session gone")
    finally:
        kill_session(head)
        _remove_ray_temp(tmp_path / "state")


def _remove_ray_temp(state: Path) -> None:
    """The nodes' Ray temp folders (logs), named by the script after its state folder."""
    checksum = subprocess.run(["cksum"], input=str(state), capture_output=True, text=True).stdout.split()[0]
    shutil.rmtree(f"/tmp/prism-ray-local-{checksum}", ignore_errors=True)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """The cluster `cluster/local.sh up` starts; `down` at the end, also when a test fails."""
    if ray.is_initialized():
        ray.shutdown()
    state = tmp_path_factory.mktemp("local-cluster")
    env = _script_env(state)
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
               "metrics": f"http://127.0.0.1:{env['METRICS_PORT']}/metrics", "pids": pids, "up": up.stdout,
               "line": line}
    finally:
        down = subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=300)
        assert down.returncode == 0, down.stderr
        assert pids == [] or f"({len(pids)} node(s) stopped)" in down.stdout, down.stdout
        for pid in pids:  # exactly the processes it started are gone
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
        _remove_ray_temp(state)


def _config(tmp_path, **kwargs) -> Path:
    cfg = recover_config(str(tmp_path / "run"), **kwargs)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _submit(cluster, *args, timeout=600):
    """`ray job submit` (the script's line) of `python -m prism_ray ARGS` from a shell without this project's
    environment, waiting for the job to end."""
    return subprocess.run([*cluster["submit"], "python", "-m", "prism_ray", *args],
                          env={**cluster["env"], "PATH": BARE_PATH}, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


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


def test_the_printed_line_runs_as_printed(local_cluster, tmp_path):
    """The line `up` printed, run by bash from a shell with no Python environment (only HOME and a bare PATH), with
    overrides appended that make the demo a tiny squeeze."""
    tiny = ["--set", f"run.output={tmp_path / 'run'}", "--set", "run.stages=[squeeze]", "--set", "data.max_per_class=4",
            "--set", "data.max_val=40", "--set", "squeeze.epochs=1"]
    done = subprocess.run(["bash", "-c", local_cluster["line"] + " " + shlex.join(tiny)], cwd=tmp_path,
                          env={"HOME": os.environ["HOME"], "PATH": BARE_PATH}, capture_output=True, text=True,
                          timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in out, out[-3000:]
    assert "ModuleNotFoundError" not in out and "command not found" not in out
    assert len(ShardStore(Storage(str(tmp_path / "run")), "squeeze").committed()) == 3  # the demo's three teachers


def test_job_runs_on_both_worker_nodes(local_cluster, tmp_path):
    cfg = _config(tmp_path, ipc=4, iterations=60, ray={"workers": 2, "cpus_per_worker": 1})
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
