"""Small recover runs for orchestration tests: random-weight teachers (no squeeze), a few classes."""
from __future__ import annotations

import posixpath
from dataclasses import dataclass

from prism_ray import pipeline
from prism_ray.config_loader import config_from_dict
from prism_ray.stages.base import RunContext, Stage, Unit, Worker
from prism_ray.stages.recover import recover_prefix
from prism_ray.storage import ShardStore, Storage, is_temp
from tests.conftest import FMNIST_ROOT


def recover_config(output: str, *, ipc: int = 6, classes: int = 4, group: int = 2, iterations: int = 10,
                   workers: int = 2, **sections):
    raw = {
        "run": {"name": "orch", "output": output, "seed": 1, "stages": ["recover"], "lease_seconds": 5},
        "data": {"dataset": "fashion_mnist", "root": FMNIST_ROOT, "classes": classes, "max_per_class": 20},
        "teachers": {"models": [{"name": "t1", "arch": "convnet", "weights": "random"},
                                {"name": "t2", "arch": "convnet", "weights": "random"}]},
        "recover": {"primary": "t1", "bn_pool": ["t2"], "ipc": ipc, "class_group": group, "iterations": iterations,
                    "schedule": "flat", "jitter": 2, "image_format": "png"},
        "baselines": {"random_real": False},
        "ray": {"workers": workers, "cpus_per_worker": 1, "max_attempts": 2},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return config_from_dict(raw)


def planned_stage(cfg, stage_name: str = "recover", record_plan: bool = True):
    """(stage, storage): the run recorded and one stage built and checked, nothing computed yet (what a driver
    does before it dispatches)."""
    storage = pipeline.open_storage(cfg)
    context = pipeline.data_context(cfg)
    pipeline.record_run(cfg, storage, context)
    (stage,) = pipeline.build_stages(cfg, storage, context, [stage_name])
    stage.prepare()
    if record_plan:
        pipeline.record_plan(stage)
    return stage, storage


def check_exactly_once(storage: Storage, set_name: str, expected_shards: int, expected_images: int) -> None:
    """Every shard committed once, every image listed once with its checksum, no image outside a manifest."""
    store = ShardStore(storage, recover_prefix(set_name))
    committed = store.committed()
    assert len(committed) == expected_shards
    listed = []
    for sid in committed:
        assert store.verify(sid) == [], sid
        listed += store.read(sid).column("path").to_pylist()
    assert len(listed) == len(set(listed)) == expected_images
    root = storage.path(store.key(""))
    # a local write a SIGKILL cut short leaves its temporary file: like the store's listings, leave it out
    on_disk = [posixpath.relpath(p, root) for p in storage.fs.find(storage.path(store.key("images")))
               if not is_temp(posixpath.basename(p))]
    assert sorted(on_disk) == sorted(listed)  # no file of an attempt that did not commit is left
    assert store.read_combined().num_rows == expected_images
    # one generation: nothing of an earlier (reset) one is left beside it
    assert [k.rsplit("/", 1)[-1] for k in storage.list(recover_prefix(set_name)) if "/g" in k] == [store.generation]


def pipeline_config(output: str, **sections):
    """All four stages on 4 Fashion-MNIST classes with random-weight teachers: seconds per stage."""
    raw = {
        "run": {"name": "e2e", "output": output, "seed": 2, "lease_seconds": 5},
        "data": {"dataset": "fashion_mnist", "root": FMNIST_ROOT, "classes": 4, "max_per_class": 20,
                 "max_val": 200},
        "teachers": {"models": [{"name": "t1", "arch": "convnet", "weights": "random"},
                                {"name": "t2", "arch": "shufflenet_v2_x0_5", "weights": "random"}]},
        "recover": {"primary": "t1", "bn_pool": ["t2"], "ipc": 2, "class_group": 4, "iterations": 5,
                    "schedule": "flat", "jitter": 2, "crop_scale": [0.8, 1.0], "image_format": "png"},
        "baselines": {"random_real": True},
        "relabel": {"mode": "stored", "mix_group": 4, "epochs_per_shard": 2},
        "evaluate": {"recipe": "prism", "students": ["convnet"], "seeds": [0, 1], "epochs": 6, "batch_size": 8,
                     "checkpoint_every": 2},
        "ray": {"workers": 2, "cpus_per_worker": 1},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return config_from_dict(raw)


def start_stage_thread(cfg, kind: str = "recover"):
    """Record the run, build the stage of `kind` and run it on Ray in a thread (this process is the driver);
    returns (stage, storage, thread, result) where result['report'] (or result['error']) appears at the end."""
    import threading

    from prism_ray import pipeline
    from prism_ray.orchestration.dispatch import run_stage_ray

    storage = pipeline.open_storage(cfg)
    context = pipeline.data_context(cfg)
    pipeline.record_run(cfg, storage, context)
    stage = pipeline.build_stages(cfg, storage, context, [kind])[0]
    stage.prepare()
    pipeline.record_plan(stage)
    result: dict = {}

    def drive():
        try:
            result["report"] = run_stage_ray(stage, cfg.ray, quiet=True)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    return stage, storage, thread, result


def wait_until(predicate, timeout: float = 120, what: str = "the condition"):
    """Poll `predicate` until it returns something true; return that value."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


@dataclass(frozen=True)
class AliveActor:
    name: str
    node_id: str


def worker_actors() -> list[AliveActor]:
    """The stage workers alive now, read from the GCS's actor table. Not through `ray.util.state`: that asks the
    head's dashboard, which on a loaded machine may not have registered yet ("Could not read 'dashboard' from
    GCS"), and the test clusters start without one."""
    from ray._private import state
    return [AliveActor(a["Name"], a["Address"]["NodeID"]) for a in state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"] == "StageActor"]


def unit_nodes(storage: Storage, prefix: str) -> dict[str, str]:
    """Unit id -> id of the node whose worker committed it, from the stage's unit records."""
    from prism_ray.storage import RECORDS
    store = ShardStore(storage, prefix)
    return {posixpath.basename(k)[: -len(".json")]: storage.read_json(k)["node_id"]
            for k in storage.list(store.key(RECORDS), suffix=".json")}


def sleep_stage(cfg, storage, seconds: list[float], prefix: str = "test/sleep", slow_open=None):
    """A stage of len(seconds) units whose unit i only sleeps seconds[i] (no CPU), then commits one small file:
    dispatch tests choose how long each unit takes. Prepared (its generation taken up), as a driver does.
    `slow_open` (seconds, marker file): every worker but the first to open the stage takes that long to open it."""
    stage = _SleepStage(cfg, storage, RunContext(1, ["c0"], [1]), list(seconds), prefix, slow_open)
    stage.prepare()
    return stage


class _SleepStage(Stage):
    kind = "test"

    def __init__(self, cfg, storage, context, seconds, prefix, slow_open=None):
        super().__init__(cfg, storage, context)
        self.seconds, self._prefix, self.slow_open = seconds, prefix, slow_open

    @property
    def prefix(self) -> str:
        return self._prefix

    def units(self) -> list[Unit]:
        return [Unit(f"u{i:02d}", {"seconds": s}) for i, s in enumerate(self.seconds)]

    def fingerprint(self) -> dict:
        return {"seconds": self.seconds}

    def open_worker(self) -> Worker:
        if self.slow_open:
            import os
            import time
            seconds, marker = self.slow_open
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                time.sleep(seconds)
        return _SleepWorker(self)


class _SleepWorker(Worker):
    def __init__(self, stage):
        self.stage = stage

    def compute(self, unit: Unit):
        import time
        time.sleep(unit.payload["seconds"])
        return unit.payload["seconds"]

    def commit(self, unit: Unit, computed) -> dict:
        res = self.stage.store.commit(unit.id, [(f"{unit.id}.txt", b"slept")], [{"seconds": computed}])
        return {"committed": res.committed}


def autoscaler_request() -> dict:
    """What this cluster's autoscaler is asked to make room for (`request_resources`): bundle shape -> count."""
    import json
    from collections import Counter

    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    if is_autoscaler_v2():
        from ray.autoscaler.v2.sdk import get_cluster_status
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return {tuple(sorted(r.bundle.items())): r.count
                for d in status.resource_demands.cluster_constraint_demand for r in d.bundles_by_count}
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return dict(Counter(tuple(sorted(b.items())) for b in json.loads(raw or "[]")))


def session_processes(sid: int) -> list[int]:
    """Pids of the processes of session `sid` (those a `setsid` command started, and their children)."""
    import os

    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, session
            found.append(int(entry))
    return found


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid`."""
    import os
    import signal

    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
