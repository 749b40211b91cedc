"""Running a sweep's points: the shared squeeze teachers once, then every point not finished yet as a normal run,
a record of its figures after each, `grow_from` points seeded with an earlier point's recover shards."""
from __future__ import annotations

import copy
import json
import sys
import time
from typing import Any

from prism_ray.config import ConfigError
from prism_ray.config_loader import config_from_dict
from prism_ray.formatting import hms
from prism_ray.stages.base import StageError, classify_change
from prism_ray.storage import ShardStore, Storage, new_generation
from prism_ray.sweep.grid import TEACHERS_RUN, Point, Sweep
from prism_ray.sweep.table import record_key, write_table


def _normalized(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))



def finished(storage: Storage, point: Point) -> bool:
    """The point has a record made with exactly its current config."""
    try:
        record = storage.read_json(record_key(point.name))
    except FileNotFoundError:
        return False
    return record.get("config") == _normalized(point.cfg.to_dict(redact=True))


def run_sweep(sweep: Sweep, local: bool = False, quiet: bool = False, only: list[str] | None = None,
              stream=None) -> int:
    """Run the squeeze once, then every point not finished yet; 0 when all are, 1 if some failed."""
    stream = stream or sys.stderr
    storage = Storage(sweep.output, sweep.storage_cfg)
    storage.check_writable()
    if only:
        unknown = [n for n in only if n not in {p.name for p in sweep.points}]
        if unknown:
            raise ConfigError("--only", f"unknown point(s) {', '.join(unknown)}; points: "
                                        f"{', '.join(p.name for p in sweep.points)}")
    points = [p for p in sweep.points if not only or p.name in only]
    storage.write_json("sweep.json", {"name": sweep.name, "base": sweep.base_path, "set": sweep.common,
                                      "points": [{"name": p.name, "set": p.overrides, "grow_from": p.grow_from}
                                                 for p in sweep.points], "dropped": sweep.dropped})
    for d in sweep.dropped:
        _say(stream, f"sweep: point {d} is the same run: left out")
    todo = [p for p in points if not finished(storage, p)]
    for p in points:
        if p not in todo:
            _say(stream, f"sweep: point {p.name}: finished earlier, skipped")
    failed: dict[str, str] = {}
    if todo:
        if local:
            failed = _run_points(sweep, storage, todo, local, quiet, stream)
        else:
            from prism_ray.orchestration.cluster import ray_session
            from prism_ray.orchestration.ray_logs import run_log_path
            # one Ray for the squeeze and every point
            with ray_session(sweep.points[0].cfg.ray, log_path=run_log_path(sweep.output)):
                failed = _run_points(sweep, storage, todo, local, quiet, stream)
    write_table(storage, sweep)
    _say(stream, f"sweep: table in {storage.uri('sweep.md')} and {storage.uri('sweep.parquet')}")
    if failed:
        _say(stream, f"prism-ray: sweep: {len(failed)} point(s) did not finish: "
                     + "; ".join(f"{n}: {e}" for n, e in failed.items())
                     + ". Fix the cause and rerun the same command: finished points are skipped.")
        return 1
    return 0


def _say(stream, text: str) -> None:
    print(text, file=stream, flush=True)


def _run_points(sweep: Sweep, storage: Storage, todo: list[Point], local: bool, quiet: bool, stream) -> dict:
    from prism_ray.orchestration.workers import IdleWorkers

    idle = None if local else IdleWorkers()  # one point's workers go on to the next point's stages
    try:
        return _run_each(sweep, storage, todo, local, quiet, stream, idle)
    finally:
        if idle is not None:
            idle.close()


def _run_each(sweep: Sweep, storage: Storage, todo: list[Point], local: bool, quiet: bool, stream, idle) -> dict:
    from prism_ray import pipeline
    from prism_ray.report import collect

    failed: dict[str, str] = {}
    if any(t.weights == "squeeze" for t in config_from_dict(copy.deepcopy(sweep.base_raw)).teachers.models):
        teachers = config_from_dict({**copy.deepcopy(sweep.base_raw), "run": {
            **sweep.base_raw.get("run", {}), "output": storage.uri(TEACHERS_RUN), "name": f"{sweep.name}-teachers",
            "stages": ["squeeze"]}})
        t0 = time.perf_counter()
        reports = pipeline.execute(teachers, ["squeeze"], local=local, quiet=quiet, idle=idle)
        if not all(r.complete for r in reports):
            return {"(squeeze)": f"the shared teachers did not finish; see prism-ray status {teachers.run.output}"}
        _say(stream, f"sweep: teachers ready in {storage.uri(TEACHERS_RUN)} ({time.perf_counter() - t0:.0f} s)")
    for i, p in enumerate(todo):
        _say(stream, f"sweep: point {i + 1}/{len(todo)} {p.name}: {p.changes()}")
        if p.grow_from is not None:
            if p.grow_from in failed:
                failed[p.name] = f"grows from point {p.grow_from}, which did not finish"
                continue
            seed_from(storage, sweep, p)
        t0 = time.perf_counter()
        try:
            reports = pipeline.execute(p.cfg, list(p.cfg.run.stages), local=local, quiet=quiet, idle=idle)
        except StageError as e:
            raise StageError(f"sweep point {p.name!r}: {e}") from None
        seconds = time.perf_counter() - t0
        incomplete = [r for r in reports if not r.complete]
        if incomplete or "evaluate" not in p.cfg.run.stages:
            failed[p.name] = (f"{incomplete[0].stage}: {len(incomplete[0].failed)} unit(s) failed" if incomplete
                              else "run.stages has no evaluate: nothing to tabulate")
            continue
        figures = collect(Storage(p.cfg.run.output, p.cfg.storage))
        record = {"name": p.name, "set": p.overrides, "changes": p.changes(), "grow_from": p.grow_from,
                  "config": _normalized(p.cfg.to_dict(redact=True)), "seconds": seconds,
                  **{k: figures[k] for k in ("ipc", "accuracy", "paired", "diversity", "retention", "compute")},
                  "top1": [{k: r[k] for k in ("set", "student", "seed", "top1")} for r in figures["results"]]}
        storage.write_json(record_key(p.name), _normalized(record))
        write_table(storage, sweep)
        _say(stream, f"sweep: point {p.name} done in {hms(seconds)}: " + "; ".join(
            f"{a['set']}/{a['student']} {100 * a['top1_mean']:.2f} ± {100 * a['top1_std']:.2f}"
            for a in figures["accuracy"]))
    return failed


def seed_from(storage: Storage, sweep: Sweep, point: Point) -> None:
    """Copy the committed recover shards of `point.grow_from` into `point`'s run, for every set both have
    and `point` has not started; the copy's recorded config lets the recover stage check that only the IPC
    grew. Images first, the stage record, then the manifests (the commit), as a worker writes them."""
    from prism_ray.runs import data_context
    from prism_ray.stages.recover import recover_prefix, recover_stages

    source = f"points/{point.grow_from}"
    target = f"points/{point.name}"
    cfg = point.cfg
    stage_by_set = {st.set_name: st for st in recover_stages(cfg, Storage(cfg.run.output, cfg.storage),
                                                             data_context(cfg))}
    for set_name, stage in stage_by_set.items():
        src, dst = f"{source}/{recover_prefix(set_name)}", f"{target}/{recover_prefix(set_name)}"
        src_store = ShardStore(storage, src)
        recorded = src_store.record()
        if recorded is None:
            continue  # the earlier point has no such set: this one makes it from scratch
        own = ShardStore(storage, dst).record()
        if own is not None and own["config"] != recorded["config"]:
            continue  # this point's own recover has begun (its record is its own config now)
        change = classify_change(recorded["config"], stage.current_config())
        if change.other or change.lowered:
            raise StageError(f"sweep point {point.name!r}: grow_from {point.grow_from!r}: {stage.name} differs in "
                             f"{', '.join(change.describe())}; grow_from needs the same recover settings and a "
                             f"larger (or equal) IPC")
        dst_store = ShardStore(storage, dst, generation=own["generation"] if own else new_generation())
        shards = sorted(src_store.committed() - dst_store.committed())  # an interrupted copy resumes
        for sid in shards:
            for row in src_store.read(sid).to_pylist():
                storage.write_bytes(dst_store.key(row["path"]), src_store.read_output(row))
        storage.write_json(dst_store.record_key, {**recorded, "generation": dst_store.generation})
        for sid in shards:
            storage.create_exclusive(dst_store.manifest_key(sid), storage.read_bytes(src_store.manifest_key(sid)))
