"""`prism-ray sweep CONFIG --grid SWEEP.yaml`: one base config, many points, one table.

Each point is a normal run (resumable, refused on a changed config) under OUTPUT/points/<name>. The teachers
are trained once: the squeeze stage runs in OUTPUT/teachers and every point loads their checkpoints from
there (weights: <checkpoint URI>), so no point retrains them. After each point its figures (accuracy per set
and student, the paired comparison against each baseline, within-class cosine, real-init retention, compute)
go to OUTPUT/results/<name>.json, and the table OUTPUT/sweep.parquet + OUTPUT/sweep.md is rewritten. A
resumed sweep skips every point whose record matches its config.

The sweep file (YAML):

    name: fmnist-sweep              # default: the file's name
    base: fmnist-demo.yaml          # the base config, relative to this file (CONFIG on the command line wins)
    output: runs/fmnist-sweep       # default: the base's run.output + "-sweep"
    set: {evaluate.seeds: [0, 1, 2, 3, 4]}    # overrides for every point
    vary:                           # one point per value, everything else at the base (plus a point "base")
      recovers.lr: [0.05, 0.1, 0.25]
    grid:                           # one point per combination
      recovers.jitter: [0, 2]
    points:                         # points by hand
      - {name: ipc50, set: {recover.ipc: 50}, grow_from: base}

Keys are config fields (`section.key`, as `--set`). `recovers.KEY` sets KEY in every recover of the point
(the method's and each `baselines.recover` entry), so that PRISM and SRe2L get the same budget. A point
with `grow_from: P` starts from the committed recover shards of the earlier point P (copied into its run)
and runs only the IPC indices P lacks: its recover settings must equal P's apart from a larger IPC.
Points may not set teachers, squeeze or data fields (they share the squeeze teachers): those belong in the
base config or the sweep's `set`.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

from prism_ray.config import RANDOM_REAL, Config, ConfigError, StorageConfig
from prism_ray.config_loader import apply_override, config_from_dict
from prism_ray.formatting import hms
from prism_ray.stages.base import StageError, classify_change
from prism_ray.stats import paired_difference
from prism_ray.storage import ShardStore, Storage, new_generation
from prism_ray.teacher_pool import RUN_WEIGHTS

SWEEP_KEYS = ("name", "base", "output", "set", "vary", "grid", "points")
POINT_KEYS = ("name", "set", "grow_from")
SHARED_SECTIONS = ("teachers", "squeeze", "data")  # shape the shared squeeze teachers
ALL_RECOVERS = "recovers."
TEACHERS_RUN = "teachers"
BASE_POINT = "base"


@dataclass
class Point:
    name: str
    overrides: dict[str, Any]  # as written: dotted key -> value
    grow_from: str | None = None
    cfg: Config | None = field(default=None, repr=False)

    def changes(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.overrides.items()) or "(base)"


@dataclass
class Sweep:
    name: str
    output: str
    base_path: str
    common: dict[str, Any]
    points: list[Point]
    base_raw: dict = field(repr=False, default_factory=dict)
    dropped: list[str] = field(default_factory=list)  # points that equal an earlier one

    @property
    def storage_cfg(self) -> StorageConfig:
        return self.points[0].cfg.storage


def _short(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _name_for(overrides: dict[str, Any]) -> str:
    parts = []
    for key, value in overrides.items():
        v = "-".join(str(x) for x in value) if isinstance(value, list) else str(value)
        parts.append(f"{key.rsplit('.', 1)[-1]}={v}")
    return re.sub(r"[^A-Za-z0-9._=,+-]", "-", ",".join(parts)) or BASE_POINT


def _mapping(value: Any, where: str) -> dict[str, Any]:
    """A `set`-like section: a mapping of dotted keys, or a list of 'key=value' strings."""
    if value is None:
        return {}
    if isinstance(value, list):
        out = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(where, f"expected section.key=value items, got {item!r}")
            key, _, text = item.partition("=")
            try:
                out[key.strip()] = yaml.safe_load(text) if text.strip() else None
            except yaml.YAMLError:
                out[key.strip()] = text  # as `--set` does: an unparsable value is a string
        return out
    if not isinstance(value, dict):
        raise ConfigError(where, f"must be a mapping of section.key: value, got {value!r}")
    return {str(k): v for k, v in value.items()}


def _apply(raw: dict, overrides: dict[str, Any], where: str) -> None:
    """Set dotted keys in a raw config dict; `recovers.KEY` in every recover of the config."""
    plain = {k: v for k, v in overrides.items() if not k.startswith(ALL_RECOVERS)}
    every = {k[len(ALL_RECOVERS):]: v for k, v in overrides.items() if k.startswith(ALL_RECOVERS)}
    try:
        for key, value in plain.items():
            apply_override(raw, f"{key}={json.dumps(value)}")  # JSON is YAML: the --set parser reads it back
        baselines = (raw.get("baselines") or {}).get("recover") or {}
        for key, value in every.items():
            if not key or "." in key:
                raise ConfigError(f"{ALL_RECOVERS}{key}", "expected recovers.KEY with KEY a recover field")
            for prefix in ["recover", *(f"baselines.recover.{n}" for n in baselines)]:
                apply_override(raw, f"{prefix}.{key}={json.dumps(value)}")
    except ConfigError as e:
        raise ConfigError(where, str(e)) from None


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(what, f"file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(what, f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(what, f"{path} must hold a mapping, got {type(data).__name__}")
    return data


def load_sweep(sweep_path: str, config_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read the sweep file and build every point's config (each validated) before anything runs."""
    path = Path(sweep_path)
    spec = _read_yaml(path, "--grid")
    for key in spec:
        if key not in SWEEP_KEYS:
            raise ConfigError(f"sweep.{key}", f"unknown key; allowed: {', '.join(SWEEP_KEYS)}")
    base_path = config_path or (str(path.parent / spec["base"]) if spec.get("base") else None)
    if not base_path:
        raise ConfigError("sweep.base", "no base config: give CONFIG on the command line or `base:` in the sweep")
    base_raw = _read_yaml(Path(base_path), "config")
    common = _mapping(spec.get("set"), "sweep.set")
    common.update(_mapping(list(overrides), "--set"))  # the command line wins over the sweep's `set`
    raw_common = copy.deepcopy(base_raw)
    _apply(raw_common, common, "sweep.set")
    base_cfg = config_from_dict(copy.deepcopy(raw_common))
    name = str(spec.get("name") or path.stem)
    output = str(spec.get("output") or f"{base_cfg.run.output.rstrip('/')}-sweep")

    points = _expand(spec)
    sweep = Sweep(name, output, base_path, common, [], base_raw=raw_common)
    out_storage = Storage(output, base_cfg.storage)
    # squeezed teachers come from the sweep's teachers run, through its squeeze manifest (checked by sha256)
    teachers_uri = {t.name: f"{RUN_WEIGHTS}{out_storage.full_uri(TEACHERS_RUN)}"
                    for t in base_cfg.teachers.models if t.weights == "squeeze"}
    seen: dict[str, str] = {}
    for p in points:
        raw = copy.deepcopy(raw_common)
        where = f"sweep point {p.name!r}"
        for key in p.overrides:
            if key.split(".", 1)[0] in SHARED_SECTIONS or key in ("run.output", "run.name"):
                raise ConfigError(where, f"sets {key}, but points share the squeeze teachers and the sweep's "
                                         f"layout; set it in the base config or the sweep's `set`")
        _apply(raw, p.overrides, where)
        raw.setdefault("run", {}).update(output=out_storage.full_uri(f"points/{p.name}"), name=f"{name}-{p.name}")
        # the resolved teachers (defaults included), squeezed ones replaced by the shared checkpoints
        raw["teachers"] = {**(raw.get("teachers") or {}), "models": [
            {**dataclasses.asdict(t), "weights": teachers_uri.get(t.name, t.weights)}
            for t in base_cfg.teachers.models]}
        try:
            p.cfg = config_from_dict(raw)
        except ConfigError as e:
            raise ConfigError(where, str(e)) from None
        key = json.dumps({k: v for k, v in p.cfg.to_dict().items() if k != "run"} | {
            "seed": p.cfg.run.seed, "stages": p.cfg.run.stages}, sort_keys=True, default=str)
        if key in seen:  # e.g. a `vary` value equal to the base's: the same run twice
            sweep.dropped.append(f"{p.name} (= {seen[key]})")
            continue
        seen[key] = p.name
        sweep.points.append(p)
    names = [p.name for p in sweep.points]
    for i, p in enumerate(sweep.points):
        if p.grow_from is not None and p.grow_from not in names[:i]:
            raise ConfigError(f"sweep point {p.name!r}.grow_from", f"{p.grow_from!r} is not an earlier point; "
                                                                   f"earlier points: {', '.join(names[:i]) or 'none'}")
    return sweep


def _expand(spec: dict) -> list[Point]:
    """Every point of the file: `base` (with vary; a point named `base` in `points` replaces it, e.g. to add
    the random-real baseline there only), one per `vary` value, the `grid` product, then `points`."""
    points: list[Point] = []
    explicit: list[Point] = []
    for i, item in enumerate(spec.get("points") or []):
        where = f"sweep.points[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(where, f"must be a mapping with name, set, grow_from; got {item!r}")
        for key in item:
            if key not in POINT_KEYS:
                raise ConfigError(f"{where}.{key}", f"unknown key; allowed: {', '.join(POINT_KEYS)}")
        overrides = _mapping(item.get("set"), f"{where}.set")
        explicit.append(Point(str(item.get("name") or _name_for(overrides)), overrides,
                              grow_from=item.get("grow_from")))
    vary = _mapping(spec.get("vary"), "sweep.vary")
    grid = _mapping(spec.get("grid"), "sweep.grid")
    for section, values_of in (("vary", vary), ("grid", grid)):
        for key, values in values_of.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.{section}.{key}", f"must be a non-empty list of values, got {values!r}")
    base = [p for p in explicit if p.name == BASE_POINT]
    if base:
        points.append(base[0])
    elif vary:
        points.append(Point(BASE_POINT, {}))
    if vary:
        for key, values in vary.items():
            points += [Point(_name_for({key: v}), {key: v}) for v in values]
    if grid:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            overrides = dict(zip(keys, combo))
            points.append(Point(_name_for(overrides), overrides))
    points += [p for p in explicit if not (base and p is base[0])]
    if not points:
        raise ConfigError("sweep", "no points: give vary, grid or points")
    names = [p.name for p in points]
    for p in points:
        if not re.fullmatch(r"[A-Za-z0-9._=,+-]+", p.name):
            raise ConfigError(f"sweep point {p.name!r}", "names may hold letters, digits and . _ = , + - only")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError("sweep.points", f"point names used twice: {', '.join(dupes)}")
    return points


# ------------------------------------------------------------------------------------------------ running


def _normalized(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def record_key(name: str) -> str:
    return f"results/{name}.json"


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
            with ray_session(sweep.points[0].cfg.ray):  # one Ray for the squeeze and every point
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
    from prism_ray import pipeline
    from prism_ray.report import collect

    failed: dict[str, str] = {}
    if any(t.weights == "squeeze" for t in config_from_dict(copy.deepcopy(sweep.base_raw)).teachers.models):
        teachers = config_from_dict({**copy.deepcopy(sweep.base_raw), "run": {
            **sweep.base_raw.get("run", {}), "output": storage.uri(TEACHERS_RUN), "name": f"{sweep.name}-teachers",
            "stages": ["squeeze"]}})
        t0 = time.perf_counter()
        reports = pipeline.execute(teachers, ["squeeze"], local=local, quiet=quiet)
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
            reports = pipeline.execute(p.cfg, list(p.cfg.run.stages), local=local, quiet=quiet)
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


# ------------------------------------------------------------------------------------------------ the table


def table_rows(records: list[dict]) -> list[dict]:
    """One row per point x set x student: accuracy, the method minus this set (paired, 95 % interval), this
    set minus the same set at the first point (paired by student seed across runs: a seed starts from the
    same weights in every point of one run seed), within-class cosine, real-init retention, final CE, cost."""
    def per_seed(rec: dict) -> dict[tuple[str, str], dict[int, float]]:
        out: dict[tuple[str, str], dict[int, float]] = {}
        for r in rec.get("top1", []):
            out.setdefault((r["set"], r["student"]), {})[r["seed"]] = r["top1"]
        return out

    reference = per_seed(records[0]) if records else {}
    same_seed_root = {rec["config"]["run"]["seed"] for rec in records}
    rows = []
    for rec in records:
        seeds = per_seed(rec)
        method = rec["config"]["recover"]["name"]
        cosine = {d["set"]: d["mean_cosine"] for d in rec["diversity"]}
        keep = {r["set"]: r for r in rec["retention"]}
        paired = {(p["baseline"], p["student"]): p for p in rec["paired"]}
        recover_seconds = {c["stage"].split("/", 1)[-1]: c["seconds"] for c in rec["compute"]
                           if c["stage"].startswith("recover/")}
        for a in rec["accuracy"]:
            p = paired.get((a["set"], a["student"]))
            key = (a["set"], a["student"])
            vs_first = None
            if rec is not records[0] and len(same_seed_root) == 1 and key in reference:
                vs_first = paired_difference(seeds.get(key, {}), reference[key])
            rows.append({
                "point": rec["name"], "changes": rec["changes"], "ipc": rec["ipc"], "set": a["set"],
                "student": a["student"], "seeds": len(a["seeds"]), "top1_mean": a["top1_mean"],
                "top1_std": a["top1_std"], "top5_mean": a["top5_mean"], "top5_std": a["top5_std"],
                "method": method, "method_minus_set": p["mean"] if p else None,
                "method_minus_set_low": p["low"] if p else None, "method_minus_set_high": p["high"] if p else None,
                "first_point": records[0]["name"], "minus_first": vs_first["mean"] if vs_first else None,
                "minus_first_low": vs_first["low"] if vs_first else None,
                "minus_first_high": vs_first["high"] if vs_first else None,
                "mean_cosine": cosine.get(a["set"]),
                "init_ssim": keep[a["set"]]["mean"] if a["set"] in keep else None,
                "init_ssim_ref": keep[a["set"]]["reference"] if a["set"] in keep else None,
                "loss_ce": keep[a["set"]]["loss_ce"] if a["set"] in keep else None,
                "recover_seconds": recover_seconds.get(a["set"]), "point_seconds": rec["seconds"]})
    return rows


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:+.2f}"


def markdown(sweep: Sweep, rows: list[dict], teachers: list[dict]) -> str:
    lines = [f"# Sweep {sweep.name}", "",
             f"Base config `{sweep.base_path}`; every point: "
             + (", ".join(f"`{k}={_short(v)}`" for k, v in sweep.common.items()) or "no common overrides") + ".",
             f"Points run: {len({r['point'] for r in rows})} of {len(sweep.points)}"
             + (f"; left out as duplicates: {', '.join(sweep.dropped)}" if sweep.dropped else "") + ".", ""]
    if teachers:
        lines += ["Shared teachers (squeeze, once): " + ", ".join(
            f"{t['teacher']} ({t['arch']}) {100 * t['val_top1']:.1f} %" for t in teachers) + ".", ""]
    lines += ["Top-1 on the real validation set (mean ± std over student seeds, in %); Δ method − set: the method "
              "minus this set within the point, paired by student seed, with its 95 % t interval, in points; Δ vs "
              "the first point: this set and student minus the same at the first point, paired by seed; cosine = mean within-class cosine similarity "
              "of the primary's features (lower = more diverse); init SSIM = SSIM to the k-th real image of "
              "the class (the image it started from for real init; for noise init, a no-retention level); final CE = "
              "the primary's mean cross-entropy on the set's images at the last recover iteration.", "",
              "| point | changes | set | student | top-1 (%) | Δ method − set [95 % CI] | Δ vs "
              f"{rows[0]['first_point'] if rows else 'first point'} [95 % CI] | cosine | init SSIM | final CE | "
              "recover s | point min |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def delta(r: dict, key: str) -> str:
        if r[key] is None:
            return ""
        text = _pct(r[key])
        if r[f"{key}_low"] is not None:
            text += f" [{_pct(r[f'{key}_low'])}, {_pct(r[f'{key}_high'])}]"
        return text

    for r in rows:
        cosine = "" if r["mean_cosine"] is None else f"{r['mean_cosine']:.4f}"
        kept = "" if r["init_ssim"] is None else f"{r['init_ssim']:.3f} ({r['init_ssim_ref']})"
        ce = "" if r["loss_ce"] is None else f"{r['loss_ce']:.3f}"
        recover_s = "" if r["recover_seconds"] is None else f"{r['recover_seconds']:.0f}"
        lines.append(f"| {r['point']} | {r['changes']} | {r['set']} | {r['student']} | {100 * r['top1_mean']:.2f} ± "
                     f"{100 * r['top1_std']:.2f} ({r['seeds']}) | {delta(r, 'method_minus_set')} | "
                     f"{delta(r, 'minus_first')} | {cosine} | {kept} | {ce} | {recover_s} | "
                     f"{r['point_seconds'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


def write_table(storage: Storage, sweep: Sweep) -> list[dict]:
    """sweep.parquet and sweep.md from the records of the finished points, in the sweep's order."""
    records = []
    for p in sweep.points:
        try:
            records.append(storage.read_json(record_key(p.name)))
        except FileNotFoundError:
            continue
    rows = table_rows(records)
    try:
        teachers = ShardStore(storage, f"{TEACHERS_RUN}/squeeze").read_combined().to_pylist()
    except FileNotFoundError:
        teachers = []
    if rows:
        storage.write_table("sweep.parquet", pa.Table.from_pylist(rows))
    storage.write_bytes("sweep.md", markdown(sweep, rows, teachers).encode())
    return rows


__all__ = ["RANDOM_REAL", "Sweep", "Point", "load_sweep", "run_sweep", "write_table", "table_rows"]
