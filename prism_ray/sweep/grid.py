"""The sweep file into points: `set`, `vary`, `grid` and `points` expanded, each point's config built and validated
(before anything runs), duplicates dropped. The file's format is described in `prism_ray.sweep`."""
from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prism_ray.config import Config, ConfigError, StorageConfig
from prism_ray.config_loader import apply_override, config_from_dict
from prism_ray.storage import Storage
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
