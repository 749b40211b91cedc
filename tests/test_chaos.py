"""The demo config at toy size under everything that goes wrong in practice at once: a second driver started on
the same run, a worker killed mid-stage, a `--fresh` reset whose driver is killed half-way, and a resume that
must take over the dead driver's lease. The run ends complete, of one lineage, every output verified."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from prism_ray.status import verify_run
from prism_ray.storage import GENERATION, ShardStore, Storage
from tests.orchestration.helpers import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "configs" / "fmnist-demo.yaml")
STAGES = ("squeeze", "recover/prism", "recover/sre2l", "recover/random_real", "relabel", "evaluate/diversity",
          "evaluate/students")


def toy(out: str) -> list[str]:
    """The demo's config at toy size: 4 classes, IPC 2, a few iterations and epochs."""
    sets = {"run.output": out, "run.lease_seconds": 5, "data.classes": 4, "data.max_per_class": 40,
            "data.max_val": 200, "squeeze.epochs": 0.25, "recover.ipc": 2, "recover.class_group": 2,
            "recover.iterations": 40, "baselines.recover.sre2l.iterations": 10, "relabel.mix_group": 4,
            "relabel.epochs_per_shard": 2, "evaluate.epochs": 4, "evaluate.batch_size": 8,
            "evaluate.seeds": "[0, 1]", "evaluate.students": "[convnet]", "evaluate.checkpoint_every": 2}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def driver(command: str, out: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "prism_ray", command, DEMO, *toy(out), *extra],
                            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stage_actor_pids() -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::StageActor"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def generations(storage: Storage) -> dict[str, str | None]:
    return {p: ShardStore(storage, p).generation for p in STAGES}


def test_chaos(tmp_path):
    out = str(tmp_path / "run")
    storage = Storage(out)
    first = driver("run", out)
    try:
        wait_until(lambda: ShardStore(storage, "recover/prism").committed(), timeout=300,
                   what="the first driver's first recover shard")
        second = subprocess.run([sys.executable, "-m", "prism_ray", "run", DEMO, *toy(out)], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is in use by another driver (host" in second.stderr
        killed = wait_until(stage_actor_pids, timeout=120, what="a worker of the first driver")[0]
        os.kill(killed, signal.SIGKILL)
        _, err = first.communicate(timeout=900)
    finally:
        first.kill()
    assert first.returncode == 0, err[-3000:]  # the killed worker's units were requeued, none failed
    made = generations(storage)
    assert all(made.values()) and verify_run(storage) == []

    # recover --fresh: resets recover and everything after it; its driver is killed half-way (SIGKILL: its
    # lease is left behind, unreleased)
    fresh = driver("recover", out, "--fresh")
    try:
        wait_until(lambda: (ShardStore(storage, "recover/prism").generation != made["recover/prism"]
                            and ShardStore(storage, "recover/prism").committed()), timeout=300,
                   what="the reset's first new shard")
    finally:
        fresh.send_signal(signal.SIGKILL)
        fresh.wait()
    wait_until(lambda: not stage_actor_pids(), timeout=120, what="the killed driver's workers ending")

    # the resume takes the stale lease over and finishes everything from the new generation
    resume = subprocess.run([sys.executable, "-m", "prism_ray", "run", DEMO, *toy(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert "taking over the run's lease" in resume.stderr
    now = generations(storage)
    assert all(now[p] != made[p] for p in STAGES if p != "squeeze")  # every stage after recover was made again
    assert now["squeeze"] == made["squeeze"]
    assert verify_run(storage) == []
    for prefix in STAGES:  # one generation per stage: nothing of an older one is left
        gens = [k.rsplit("/", 1)[-1] for k in storage.list(prefix) if GENERATION.fullmatch(k.rsplit("/", 1)[-1])]
        assert gens == [now[prefix]], prefix
        plan = storage.read_json(f"{prefix}/plan.json")["units"]
        assert ShardStore(storage, prefix).committed() == set(plan), prefix
    lineage = {r["stage"]: r for r in storage.read_json("report/report.json")["lineage"]}
    for stage in ("relabel", "evaluate/diversity", "evaluate/students"):
        for up, made_from in lineage[stage]["upstream"].items():
            assert made_from["generation"] == now[up], (stage, up)
    assert lineage["evaluate/students"]["upstream"]["relabel"]["generation"] == now["relabel"]
    verified = subprocess.run([sys.executable, "-m", "prism_ray", "status", out, "--verify"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert verified.returncode == 0 and "every committed output matches its manifest" in verified.stderr
