"""Reading configs: a YAML file and `section.key=value` overrides into the typed `Config`, presets resolved,
every field converted and checked, then the cross-field rules of `config.validate`.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from prism_ray.config import RECOVER_SHARED_KEYS, Config, ConfigError, RecoverConfig, validate

PRESET_DIR_ENV = "PRISM_RAY_PRESETS"

def preset_dir() -> Path:
    env = os.environ.get(PRESET_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "presets"  # shipped inside the package: wheels have them too


def list_presets(kind: str) -> list[str]:
    d = preset_dir() / kind
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def load_preset(kind: str, name: str, field_path: str) -> dict:
    path = preset_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(field_path, f"unknown preset {name!r}; allowed: {', '.join(list_presets(kind)) or 'none'}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(field_path, f"preset file {path} is not a mapping")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults), apply `section.key=value` overrides, resolve presets, validate."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config", f"file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError("config", f"{p} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") \
                from None
        except yaml.YAMLError as e:
            raise ConfigError("config", f"{p} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError("config", f"{p} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line out of PyYAML's multi-line message: what is wrong, and where."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def apply_override(raw: dict, item: str) -> None:
    """`recover.lr=0.1` (value parsed as YAML, so lists and numbers work) into the raw config dict."""
    if "=" not in item:
        raise ConfigError("--set", f"expected section.key=value, got {item!r}")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError("--set", f"expected section.key=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is not a section, cannot set a key inside it")
        node = nxt
    node[parts[-1]] = value


def config_from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("config", "must be a mapping of sections")
    raw = dict(raw)
    if "recover" in raw:
        raw["recover"] = _resolve_preset(raw["recover"], "recover", "recover")
    if "evaluate" in raw:
        raw["evaluate"] = _resolve_preset(raw["evaluate"], "evaluate", "evaluate", key="recipe")
    cfg = _build(Config, raw, "")
    if cfg.recover.bn_pool is None:  # not given: every other teacher may align BN statistics
        cfg.recover.bn_pool = [t.name for t in cfg.teachers.models if t.name != cfg.recover.primary]
    main = dataclasses.asdict(cfg.recover)
    for name, overrides in cfg.baselines.recover.items():
        path = f"baselines.recover.{name}"
        if not isinstance(overrides, dict):
            raise ConfigError(path, f"must be a mapping of recover keys (e.g. {{preset: sre2l}}), got {overrides!r}; "
                                    f"to drop a baseline, leave it out of baselines.recover")
        # main recover < preset < the baseline's own keys; shared keys always from the main recover
        own = _resolve_preset({**overrides, "name": name}, "recover", path)
        merged = {**{k: v for k, v in main.items() if k != "preset"}, **own}
        for k in RECOVER_SHARED_KEYS:
            merged[k] = main[k]
        cfg._baseline_recovers[name] = _build(RecoverConfig, merged, path)
    validate(cfg)
    return cfg


def _resolve_preset(section: Any, kind: str, path: str, key: str = "preset") -> Any:
    if not isinstance(section, dict) or not section.get(key):
        return section
    name = section[key]
    if not isinstance(name, str):
        raise ConfigError(f"{path}.{key}", f"must be a preset name (string), got {name!r}")
    base = load_preset(kind, name, f"{path}.{key}")
    return {**base, **section}


# ------------------------------------------------------------------------------------- generic dict -> type


# How a field's type is worded: in an error ("must be an integer") and in docs/config.md's type column ("int").
_SCALARS = {int: ("an integer", "int"), float: ("a number", "float"), str: ("a string", "string"),
            bool: ("true or false", "bool")}


def describe_type(tp: Any, brief: bool = False) -> str:
    """A field's type in words: a phrase for error messages, or (`brief`) the short form of the config reference."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if not brief:
            return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
        kinds = {type(a) for a in typing.get_args(tp)}
        return "bool" if kinds == {bool} else "choice" if len(kinds) == 1 else "choice or bool"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return " or ".join(describe_type(a, brief) for a in args) + (" or empty" if optional else "")
    if origin is list:
        return ("list of " if brief else "a list of ") + describe_type(typing.get_args(tp)[0], brief)
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "mapping" if brief else "a mapping"
    if tp in _SCALARS:
        return _SCALARS[tp][brief]
    return getattr(tp, "__name__", str(tp)) if brief else str(tp)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, path)
        for arg in args:  # e.g. ray.workers: a number or 'auto'
            try:
                return _convert(arg, value, path)
            except ConfigError:
                pass
        raise ConfigError(path, f"must be {describe_type(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        # True == 1 in Python: a choice matches only a value of its own kind (bool or not)
        if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
            raise ConfigError(path, f"got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
        return value
    if value is None:
        raise ConfigError(path, f"must be {describe_type(tp)}, got nothing")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be {describe_type(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(path, f"must be a string, got {value!r}")
        return str(value)
    raise ConfigError(path, f"unsupported type {tp}")  # pragma: no cover - a bug in this module


def _build(cls: type, raw: Any, path: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path or "config", f"must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(where, f"unknown key{hint}; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        fpath = f"{path}.{name}" if path else name
        if name in raw:
            value = _convert(hints[name], raw[name], fpath)
            _check_rules(f.metadata, value, fpath)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(fpath, f"is required ({describe_type(hints[name])})")
    return cls(**kwargs)


def _check_rules(meta: Any, value: Any, path: str) -> None:
    if value is None:
        return
    if meta.get("nonempty") and len(value) == 0:
        raise ConfigError(path, "must not be empty")
    bounds = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for key, ok, sym in bounds:
        if key in meta and not ok(value, meta[key]):
            allowed = " and ".join(f"{s} {meta[k]}" for k, _, s in bounds if k in meta)
            raise ConfigError(path, f"got {value!r}; allowed: {allowed}")
