"""The tail of a stage: three workers, units of unequal length. A unit that waits behind a busy worker's unit
moves to a worker that has become idle, no worker is ended while such a unit waits, and the stage ends within
one (shortest) unit of the best schedule of the measured unit times on the workers as they became ready."""
from __future__ import annotations

import itertools
import re

from prism_ray.orchestration.dispatch import run_stage_ray
from prism_ray.orchestration.workers import record_key
from prism_ray.storage import Storage
from tests.orchestration.helpers import recover_config, sleep_stage

SECONDS = [3.0, 3.0] + [0.5] * 6  # two long units first, then short ones: the order a stage plans them in


def _best_end(ready: dict[int, float], seconds: list[float]) -> float:
    """The earliest time every unit can be done, over every assignment of units to workers, each worker running
    its units one after another from the moment it was ready (what no dispatch can beat)."""
    workers = sorted(ready)
    best = float("inf")
    for owners in itertools.product(workers, repeat=len(seconds)):
        ends = {w: ready[w] for w in workers}
        for w, s in zip(owners, seconds):
            ends[w] += s
        best = min(best, max(ends.values()))
    return best


def test_no_worker_idles_at_the_tail(ray_local, tmp_path):
    cfg = recover_config(str(tmp_path / "run"), ray={"workers": 3, "cpus_per_worker": 1})
    storage = Storage(str(tmp_path / "run"))
    stage = sleep_stage(cfg, storage, SECONDS)
    report = run_stage_ray(stage, cfg.ray, quiet=True)
    assert report.complete and (report.ran, report.duplicates) == (len(SECONDS), 0)
    units = [u.id for u in stage.units()]
    assert sorted(stage.store.committed()) == units  # every unit committed, once
    records = {u: storage.read_json(record_key(stage.store, u)) for u in units}
    worker = {u: int(re.search(r"/worker-(\d+)/", r["worker"]).group(1)) for u, r in records.items()}

    events = report.events
    sent = {e[2]: e[1] for e in events if e[0] == "sent"}  # the last time each unit was sent (after any move)
    ended = [e[1] for e in events if e[0] == "ended"]
    ready = {e[2]: e[1] for e in events if e[0] == "ready"}
    assert len(ready) == 3 and set(worker.values()) <= set(ready)
    for u in units:  # a unit that waited behind another unit of its worker: no worker ended meanwhile
        r = records[u]
        behind = [v for v in units if v != u and worker[v] == worker[u]
                  and records[v]["started"] < r["started"] and records[v]["computed"] > sent[u]]
        if behind:
            assert not [t for t in ended if sent[u] < t < r["started"]], \
                f"unit {u} waited behind {behind} on worker {worker[u]} while a worker was ended"
    # two long units and six short ones on three workers: the short ones go to the third worker (or move to it)
    measured = [records[u]["computed"] - records[u]["started"] for u in units]
    end = max(r["computed"] for r in records.values())
    t0 = min(ready.values())
    timeline = "\n".join(f"{e[1] - t0:7.3f} {e[0]} {e[2:]}" for e in events) + "\n" + "\n".join(
        f"{u} on worker {worker[u]}: {r['started'] - t0:.3f}-{r['computed'] - t0:.3f}" for u, r in records.items())
    assert end <= _best_end(ready, measured) + min(measured), \
        f"ended at {end - t0:.3f}, best {_best_end(ready, measured) - t0:.3f}\n{timeline}"
