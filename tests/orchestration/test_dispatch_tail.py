"""The tail of a stage: three workers, units of unequal length. A unit that waits behind a busy worker's unit
moves to a worker that has become idle, no worker is ended while such a unit waits, and the stage ends within
one (shortest) unit of the best schedule of the measured unit times on the workers as they became ready. A
worker computes its units in the order they were sent, whatever order its calls begin in."""
from __future__ import annotations

import itertools
import re
import threading
import time

from prism_ray.orchestration import workers
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


def _run_in_threads(actor, units, turns, start_order):
    """Call actor.run(units[i], turns[i]) from one thread each, the calls begun in `start_order` (as a threaded
    Ray actor may begin them); return each call's result by unit index."""
    results = {}
    threads = []
    for i in start_order:
        t = threading.Thread(target=lambda i=i: results.__setitem__(i, actor.run(units[i], turns[i])))
        t.start()
        threads.append(t)
        time.sleep(0.05)  # each call is waiting before the next begins
    for t in threads:
        t.join(timeout=30)
    return results


def test_a_worker_computes_its_units_in_the_order_they_were_sent(ray_local, tmp_path, monkeypatch):
    monkeypatch.setattr(workers, "set_torch_threads", lambda cpus: None)  # the test process keeps its threads
    cfg = recover_config(str(tmp_path / "run"))
    storage = Storage(str(tmp_path / "run"))
    stage = sleep_stage(cfg, storage, [0.2] * 5)
    actor = workers.StageActor(stage, "worker-0", 1, 0, False)
    units = stage.units()
    # calls begin last-sent first; unit 2 is withdrawn (moved to another worker) before its call begins
    assert actor.withdraw(units[2].id)
    results = _run_in_threads(actor, units, turns=[0, 1, 2, 3, 4], start_order=[4, 3, 2, 1, 0])
    assert results[2] == {"withdrawn": True}
    ran = [i for i in range(5) if i != 2]
    assert all(results[i]["committed"] for i in ran)
    started = sorted(ran, key=lambda i: results[i]["started"])
    assert started == ran, f"computed in the order {started}, sent in the order {ran}"
    assert not actor.withdraw(units[4].id)  # a unit that began is never taken back
