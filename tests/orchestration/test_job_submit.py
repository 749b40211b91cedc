"""`ray job submit` of one config to a Ray head on loopback with token authentication: the whole pipeline
runs as a Ray job and leaves its report in storage."""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from prism_ray.status import run_status
from prism_ray.storage import Storage
from tests.conftest import free_port
from tests.orchestration.helpers import pipeline_config, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:  # it answers (401 without a token): it is up
        pass
    except OSError:
        return False
    return True


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def head(tmp_path):
    if ray.is_initialized():
        ray.shutdown()
    port, dashboard, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # --block keeps the head in the foreground: terminating it stops exactly the processes it started
    proc = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=3",
                             "--include-dashboard=true", f"--dashboard-agent-listen-port={agent}"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_until(lambda: _answers(f"{url}/api/version"), what="the Ray head's job server coming up")
        # the job server waits only 10 s for the head's agent, which comes up after it on a busy machine
        wait_until(lambda: _accepts(agent), what="the Ray head's job agent coming up")
    except AssertionError:
        proc.terminate()
        raise
    yield url, env
    proc.terminate()
    proc.wait(timeout=90)


def test_job_submit_runs_the_pipeline(head, tmp_path):
    url, env = head
    out = tmp_path / "run"
    cfg = pipeline_config(str(out), evaluate={"seeds": [0]})
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    submit = [RAY, "job", "submit", "--address", url, "--", sys.executable, "-m", "prism_ray", "run",
              str(cfg_path), "--quiet"]
    done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    storage = Storage(str(out))
    stages = {s["stage"]: s for s in run_status(storage)["stages"]}
    assert all(s["complete"] for s in stages.values()) and "evaluate/students" in stages
    assert storage.exists("report/report.md")

    # without the token the job server turns the client away
    denied = subprocess.run(submit, cwd=REPO, env={**env, "RAY_AUTH_TOKEN": "not-the-token"},
                            capture_output=True, text=True, timeout=120)
    assert denied.returncode != 0 and "token" in (denied.stdout + denied.stderr).lower()
