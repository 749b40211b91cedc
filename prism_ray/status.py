"""`prism-ray status`: per stage, what is planned, committed, missing and failed, from storage alone."""
from __future__ import annotations

import json
import sys

from prism_ray.config import STAGES
from prism_ray.runs import RUN_RECORD
from prism_ray.stages.base import StageError
from prism_ray.storage import ShardStore, Storage


def stage_prefixes(storage: Storage) -> list[str]:
    """Every stage of the run that has recorded a plan, in pipeline order."""
    found = []
    for kind in STAGES:
        if storage.exists(f"{kind}/plan.json"):
            found.append(kind)
        for sub in storage.list(kind):
            if storage.exists(f"{sub}/plan.json"):
                found.append(sub)
    return found


def run_status(storage: Storage) -> dict:
    if not storage.exists(RUN_RECORD):
        raise StageError(f"no prism-ray run at {storage.uri()} (no {RUN_RECORD}); check the URI and storage "
                         f"endpoint")
    record = storage.read_json(RUN_RECORD)
    stages = []
    for prefix in stage_prefixes(storage):
        plan = storage.read_json(f"{prefix}/plan.json")
        store = ShardStore(storage, prefix)
        planned = list(plan["units"])
        committed = store.committed() & set(planned)
        failures = store.failures()  # only units still not committed
        missing = [u for u in planned if u not in committed]
        per_unit = plan.get("unit_images", {})
        stages.append({
            "stage": prefix, "unit": plan.get("unit_noun", "shard"), "planned": len(planned),
            "committed": len(committed), "missing": len(missing), "failed": len(failures),
            "images_planned": sum(per_unit.values()), "images_committed": sum(per_unit.get(u, 0) for u in committed),
            "failed_storage": sum(1 for v in failures.values() if v.get("kind") == "storage"),
            "complete": not missing, "combined_manifest": storage.exists(f"{prefix}/manifest.parquet"),
            "missing_units": missing[:50],
            "failures": {k: {"error": v.get("error"), "attempts": v.get("attempts"), "kind": v.get("kind", "compute")}
                         for k, v in failures.items()},
        })
    return {"run": storage.uri(), "name": record.get("config", {}).get("run", {}).get("name"), "stages": stages}


def print_status(storage: Storage, as_json: bool = False, stream=None) -> int:
    stream = stream or sys.stdout
    st = run_status(storage)
    if as_json:
        print(json.dumps(st, indent=2), file=stream)
        return 0
    print(f"run {st['name']} at {st['run']}", file=stream)
    header = (f"{'stage':<28}{'unit':>9}{'planned':>9}{'committed':>11}{'missing':>9}{'failed':>8}{'(storage)':>10}"
              f"{'images':>16}")
    print(header, file=stream)
    for s in st["stages"]:
        images = f"{s['images_committed']}/{s['images_planned']}" if s["images_planned"] else "-"
        print(f"{s['stage']:<28}{s['unit']:>9}{s['planned']:>9}{s['committed']:>11}{s['missing']:>9}"
              f"{s['failed']:>8}{s['failed_storage']:>10}{images:>16}", file=stream)
    for s in st["stages"]:
        for uid, f in sorted(s["failures"].items()):
            print(f"failed ({f['kind']}) {s['stage']} {uid} after {f['attempts']} attempt(s): {f['error']}",
                  file=stream)
    if not st["stages"]:
        print("no stage has started yet", file=stream)
    return 0
