"""`prism-ray status`: per stage, what is planned, committed, missing and failed, from storage alone."""
from __future__ import annotations

import io
import json
import sys
import time

from prism_ray.config import STAGES
from prism_ray.runs import RUN_RECORD
from prism_ray.stages.base import StageError
from prism_ray.lease import current_holder, describe_holder
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
        record = store.record() or {}
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
            "complete": not missing, "combined_manifest": store.complete(),
            "generation": record.get("generation"), "config_digest": record.get("config_digest"),
            "made_from": {u: (v or {}).get("generation") for u, v in (record.get("upstream") or {}).items()},
            "missing_units": missing[:50],
            "failures": {k: {"error": v.get("error"), "attempts": v.get("attempts"), "kind": v.get("kind", "compute")}
                         for k, v in failures.items()},
        })
    holder = current_holder(storage)
    lease = None
    if holder is not None:
        lease = {"number": holder["number"], "host": holder.get("host"), "pid": holder.get("pid"),
                 "released": bool(holder.get("released")), "renewed_at": holder.get("renewed_at"),
                 "describe": describe_holder(holder)}
    return {"run": storage.uri(), "name": record.get("config", {}).get("run", {}).get("name"), "stages": stages,
            "lease": lease}


def print_status(storage: Storage, as_json: bool = False, stream=None, status: dict | None = None) -> int:
    stream = stream or sys.stdout
    st = status if status is not None else run_status(storage)
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
        if s.get("generation"):
            made_from = ", ".join(f"{u} {g}" for u, g in sorted(s["made_from"].items()))
            print(f"lineage {s['stage']}: generation {s['generation']}, config {s['config_digest']}"
                  + (f", made from {made_from}" if made_from else ""), file=stream)
    lease = st.get("lease")
    if lease:
        state = "released" if lease["released"] else "held"
        print(f"driver lease {lease['number']} {state}: {lease['describe']}", file=stream)
    for s in st["stages"]:
        for uid, f in sorted(s["failures"].items()):
            print(f"failed ({f['kind']}) {s['stage']} {uid} after {f['attempts']} attempt(s): {f['error']}",
                  file=stream)
    if not st["stages"]:
        print("no stage has started yet", file=stream)
    return 0


def verify_run(storage: Storage) -> list[str]:
    """Problems with a run's committed outputs: for every stage, each output every manifest lists must exist with
    its recorded size and sha256, and every upstream output a stage recorded must be the one the run holds now.
    Reads every output once (a full scan)."""
    from prism_ray.stages.base import identity

    problems = []
    for prefix in stage_prefixes(storage):
        store = ShardStore(storage, prefix)
        for sid in sorted(store.committed()):
            problems += [f"{prefix} {sid}: {p}" for p in store.verify(sid)]
        record = store.record() or {}
        for up, recorded in sorted((record.get("upstream") or {}).items()):
            if store.committed() and identity(storage, up) != recorded:
                problems.append(f"{prefix}: made from {up} generation {(recorded or {}).get('generation')}, which "
                                f"the run no longer holds as it was")
    return problems


def run_outcome(st: dict) -> str | None:
    """'complete' once every planned stage is committed; 'failed' once the first unfinished stage has a failure
    record for every missing unit (its driver has given up on them); None while the run may still progress."""
    stages = st["stages"]
    if stages and all(s["complete"] for s in stages):
        return "complete"
    first = next((s for s in stages if not s["complete"]), None)
    if first and first["failed"] >= first["missing"] > 0:  # failure records are kept for missing units only
        return "failed"
    return None


def watch(storage: Storage, interval: float = 5.0, as_json: bool = False, stream=None,
          sleep=time.sleep) -> int:
    """Print the status again whenever it changes, until the run completes (0) or stops with failed units (1).

    On a terminal the table is redrawn in place; elsewhere (a log) each change is a new block with its time.
    Before the run has written its record, this waits for it.
    """
    try:
        return _watch(storage, interval, as_json, stream or sys.stdout, sleep)
    except KeyboardInterrupt:  # stopping a watch is not an error; the run goes on without it
        return 130


def _watch(storage: Storage, interval: float, as_json: bool, stream, sleep) -> int:
    tty = hasattr(stream, "isatty") and stream.isatty()
    last, said_waiting = None, False
    while True:
        if not storage.exists(RUN_RECORD):
            if not said_waiting:
                print(f"no run at {storage.uri()} yet; waiting for it to start (Ctrl-C to stop)", file=stream,
                      flush=True)
                said_waiting = True
            sleep(interval)
            continue
        st = run_status(storage)
        buf = io.StringIO()
        if as_json:
            buf.write(json.dumps(st, sort_keys=True) + "\n")
        else:
            print_status(storage, stream=buf, status=st)
        text = buf.getvalue()
        if text != last:
            if tty and not as_json:
                stream.write("\x1b[H\x1b[2J")  # redraw in place
            if not as_json:
                stream.write(f"-- {time.strftime('%H:%M:%S')}\n")
            stream.write(text)
            stream.flush()
            last = text
        outcome = run_outcome(st)
        if outcome:
            if not as_json:
                print(f"run {outcome}" + (": fix the cause and rerun to finish the failed units"
                                          if outcome == "failed" else ""), file=stream, flush=True)
            return 0 if outcome == "complete" else 1
        sleep(interval)
