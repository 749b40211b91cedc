"""A run's stages share worker processes: a worker the stage ends is kept for the next stage (`IdleWorkers`),
which loads its own worker into it instead of starting a process that imports torch again. A kept worker is
ended after its keep time and when the run ends, and reports its new stage's peak memory."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from prism_ray import pipeline
from prism_ray.memory import peak_rss_bytes, reset_peak_rss
from prism_ray.orchestration.dispatch import run_stage_ray
from prism_ray.orchestration import workers
from prism_ray.orchestration.progress import StageRun
from prism_ray.orchestration.workers import IdleWorkers, WorkerPool
from prism_ray.storage import RECORDS, Storage
from tests.orchestration.helpers import pipeline_config, recover_config, sleep_stage


def _record_pids(output, stage_folder: str) -> set[int]:
    return {json.loads(p.read_text())["pid"] for p in output.glob(f"{stage_folder}/**/{RECORDS}/*.json")}


def named_workers(ray) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("idle-reuse/")]


def test_the_run_s_stages_run_in_the_workers_its_first_stage_started(ray_local, tmp_path):
    cfg = pipeline_config(str(tmp_path / "run"), baselines={"random_real": False}, run={"name": "idle-reuse"})
    reports = pipeline.execute(cfg, ["recover", "relabel"], quiet=True)
    assert all(r.complete for r in reports)
    recover, relabel = _record_pids(tmp_path / "run", "recover"), _record_pids(tmp_path / "run", "relabel")
    assert recover and relabel and relabel <= recover, (recover, relabel)
    assert reports[0].workers_started == 2 and reports[1].workers_started == 2  # loaded, not new processes
    deadline = time.monotonic() + 30  # the run ended its kept workers (ray.kill returns before they are gone)
    while named_workers(ray_local) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert named_workers(ray_local) == []


def test_a_kept_worker_is_ended_after_its_keep_time_and_only_matching_ones_are_taken(ray_local):
    @ray_local.remote
    class Idle:
        def ping(self):
            return 1

    shape, other = {"num_cpus": 1}, {"num_cpus": 0.5}
    kept = IdleWorkers(keep_seconds=60)
    a = Idle.remote()
    kept.keep(a, shape)
    assert kept.take(other) is None and kept.count(shape) == 1
    assert kept.take(shape) is a and len(kept) == 0
    short = IdleWorkers(keep_seconds=0)
    short.keep(a, shape)
    short.expire()
    assert len(short) == 0
    with pytest.raises(ray_local.exceptions.RayActorError):
        ray_local.get(a.ping.remote(), timeout=30)


def test_a_kept_worker_still_loading_when_the_units_are_done_is_kept_again(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "LOAD_SETTLE_SECONDS", 120.0)  # the stage's end waits for the slow load (3 s + load)
    cfg = recover_config(str(tmp_path / "run"), ray={"workers": 2, "cpus_per_worker": 1})
    storage = Storage(str(tmp_path / "run"))
    kept = IdleWorkers(keep_seconds=60)
    try:
        # two ready workers left by a stage, started and ended through the pool itself (a stage's own units could
        # all go to the first worker ready, leaving one)
        first = sleep_stage(cfg, storage, [0.5, 0.5], "test/a")
        pool = WorkerPool(first, cfg.ray, StageRun(first, quiet=True), tag="pair", idle=kept)
        pool.resize(2)
        for member in list(pool.starting().values()):
            ray_local.get(member.ready_ref, timeout=300)
            assert pool.started(member)
        pool.end_idle()
        assert len(kept) == 2
        # the next stage takes both; the one that opens it first takes its two short units (two in flight per
        # worker) while the other is still opening it (3 s): that one is kept again, not ended
        slow = sleep_stage(cfg, storage, [0.1, 0.1], "test/b", slow_open=(3.0, str(tmp_path / "opened")))
        second = run_stage_ray(slow, cfg.ray, quiet=True, idle=kept)
        assert second.complete and second.workers_started == 2 and len(kept) == 2
    finally:
        kept.close()


def test_a_reset_peak_is_what_the_process_holds_now():
    big = np.ones(400 << 20, dtype=np.uint8)  # 400 MB touched
    peak = peak_rss_bytes()
    del big
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    assert peak_rss_bytes() < peak - (300 << 20)
