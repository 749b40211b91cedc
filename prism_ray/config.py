"""The run's vocabulary: typed dataclass configs, loaded from YAML, overridden with `--set`, validated up front.

Every error is a `ConfigError` that names the offending field (``recover.lr``) and what is allowed, so the
CLI can print one line and exit 2 instead of a traceback. Range and choice checks live next to the field
they guard (``metadata``) so the error text and the rule cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

PRESET_DIR_ENV = "PRISM_RAY_PRESETS"
STAGES = ("squeeze", "recover", "relabel", "evaluate")
RANDOM_REAL = "random_real"


class ConfigError(ValueError):
    """A config problem a user can fix; ``field`` is the dotted path of the bad field."""

    def __init__(self, field_path: str, message: str):
        self.field = field_path
        super().__init__(f"{field_path}: {message}" if field_path else message)


def _f(default: Any = dataclasses.MISSING, *, factory: Any = None, doc: str = "", **rules: Any) -> Any:
    """A dataclass field with validation rules (ge, gt, le, lt, nonempty) kept in its metadata."""
    meta = {"doc": doc, **rules}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = _f("prism-run", doc="run name, used in logs and actor names")
    output: str = _f("runs/prism-run", doc="run URI: local path, file://, s3://bucket/prefix")
    seed: int = _f(0, ge=0, doc="root of every random draw of the run")
    stages: list[str] = _f(factory=lambda: list(STAGES), nonempty=True, doc="stages `prism-ray run` executes")


@dataclass
class DataConfig:
    dataset: Literal["fashion_mnist", "image_folder", "parquet"] = "fashion_mnist"
    root: str = _f("/usr/share/datasets/fashion-mnist", doc="fashion_mnist: folder or URI of the IDX .gz files")
    train: Optional[str] = _f(None, doc="image_folder / parquet: URI of the training split")
    val: Optional[str] = _f(None, doc="image_folder / parquet: URI of the validation split")
    channels: Literal[1, 3] = 1
    resolution: int = _f(28, ge=8, le=1024)
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    classes: Optional[int] = _f(None, ge=1, doc="use only the first N classes (small runs and tests)")
    max_per_class: Optional[int] = _f(None, ge=1, doc="cap on training images per class (squeeze)")
    max_val: Optional[int] = _f(None, ge=1, doc="cap on validation images (evaluation), first N")
    image_column: str = "image"
    label_column: str = "label"


@dataclass
class TeacherSpec:
    name: str = _f(doc="name the stages refer to")
    arch: str = _f(doc="architecture from the registry (prism-ray teachers lists them)")
    weights: str = _f("squeeze", doc="'squeeze', 'torchvision:<WEIGHTS_ENUM>', 'random', or a checkpoint URI")


def _default_teachers() -> list[TeacherSpec]:
    return [
        TeacherSpec("convnet", "convnet", "squeeze"),
        TeacherSpec("mobilenet_v2", "mobilenet_v2", "squeeze"),
        TeacherSpec("shufflenet_v2", "shufflenet_v2_x0_5", "squeeze"),
    ]


@dataclass
class TeachersConfig:
    models: list[TeacherSpec] = _f(factory=_default_teachers, nonempty=True)
    cache_dir: Optional[str] = _f(None, doc="node-local cache of torchvision weights and checkpoints")


@dataclass
class SqueezeConfig:
    epochs: float = _f(1.0, gt=0, doc="passes over the (capped) training set; fractions allowed")
    batch_size: int = _f(128, ge=1)
    lr: float = _f(0.05, gt=0)
    momentum: float = _f(0.9, ge=0, lt=1)
    weight_decay: float = _f(5e-4, ge=0)
    label_smoothing: float = _f(0.0, ge=0, lt=1)


@dataclass
class RecoverConfig:
    preset: Optional[str] = _f(None, doc="named preset under jobs/configs/presets/recover; explicit keys win")
    name: str = _f("prism", doc="name of the synthetic set this recover produces")
    primary: str = _f("convnet", doc="teacher whose logits give the CE loss")
    bn_pool: list[str] = _f(factory=list, doc="teachers the extra BN teachers are drawn from")
    selection: Literal["pre", "intra", "fixed"] = "pre"
    slots: int = _f(3, ge=0, doc="draws of extra BN teachers, each filled with slot_prob")
    slot_prob: float = _f(0.5, ge=0, le=1)
    fixed: list[str] = _f(factory=list, doc="selection=fixed: extra BN teachers used every step")
    bn_average: Literal["bn_only", "reference"] = "bn_only"
    bn_normalize: bool = _f(False, doc="divide each teacher's BN loss by its detached value when first used")
    r_bn: float = _f(0.01, ge=0)
    first_bn_multiplier: float = _f(10.0, ge=0)
    init: Literal["real", "noise"] = "real"
    lr: float = _f(0.05, gt=0)
    betas: list[float] = _f(factory=lambda: [0.5, 0.9])
    iterations: int = _f(4000, ge=1)
    schedule: Literal["cyclic", "flat"] = "cyclic"
    cyclic_step: int = _f(500, ge=0, doc="cyclic: iterations = base - cyclic_step * (ipc % cyclic_period)")
    cyclic_period: int = _f(8, ge=1)
    jitter: int = _f(32, ge=0, doc="random roll of 0..jitter pixels per step")
    crop_scale: list[float] = _f(factory=lambda: [0.08, 1.0])
    ipc: int = _f(50, ge=1, doc="images per class")
    class_group: int = _f(100, ge=1, doc="classes per cross-class batch (shard)")
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = _f(75, ge=1, le=100)
    amp: bool = _f(True, doc="bf16 autocast on CUDA (always fp32 on CPU)")
    channels_last: bool = True


# Keys a baseline recover inherits from the main recover whatever its preset says: the set must be
# comparable (same IPC, same primary, same encoding), only the method differs.
RECOVER_SHARED_KEYS = ("ipc", "class_group", "primary", "image_format", "jpeg_quality", "amp", "channels_last")


@dataclass
class BaselinesConfig:
    random_real: bool = _f(True, doc="a seeded random real subset with the same IPC")
    recover: dict[str, dict] = _f(factory=dict, doc="extra recover methods: name -> recover overrides (preset...)")


@dataclass
class RelabelConfig:
    mode: Literal["stored", "live"] = "stored"
    teachers: list[str] = _f(factory=list, doc="soft-label teachers (ensemble); empty = the recover primary")
    epochs: Optional[int] = _f(None, ge=1, doc="epochs of labels; empty = evaluate.epochs")
    mix_group: int = _f(50, ge=1, doc="images that share one CutMix box; student batches hold whole groups")
    crop_scale: list[float] = _f(factory=lambda: [0.25, 1.0])
    cutmix: bool = True
    topk: int = _f(0, ge=0, doc="store only the top-k logits (0 = all, fp16)")
    ensemble: Literal["mean_norm", "primary_weighted"] = _f(
        "mean_norm", doc="several teachers: logits rescaled to their mean norm then averaged (PRISM R18 scripts), "
                         "or half primary, half the others (PRISM R50/R101 scripts)")
    epochs_per_shard: int = _f(10, ge=1, doc="epochs of labels per stored Parquet shard")


@dataclass
class EvaluateConfig:
    recipe: Optional[str] = _f(None, doc="named preset under jobs/configs/presets/evaluate")
    students: list[str] = _f(factory=lambda: ["convnet"], nonempty=True)
    seeds: list[int] = _f(factory=lambda: [0, 1, 2], nonempty=True)
    epochs: int = _f(300, ge=1)
    batch_size: int = _f(100, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = _f(1e-3, gt=0)
    weight_decay: float = _f(0.01, ge=0)
    no_decay_norm_bias: bool = True
    loss: Literal["mse_ce", "kl"] = "mse_ce"
    schedule: Literal["cosine", "prism_reference"] = _f(
        "cosine", doc="cosine per step, or the PRISM validate code's piecewise per-epoch schedule")
    ce_weight: float = _f(0.1, ge=0)
    temperature: float = _f(4.0, gt=0)
    checkpoint_every: int = _f(50, ge=1, doc="epochs between checkpoints written to the run")
    diversity_network: Optional[str] = _f(None, doc="teacher whose features measure diversity; empty = primary")
    val_batch_size: int = _f(500, ge=1)


@dataclass
class RayConfig:
    address: Optional[str] = _f(None, doc="empty = start a local Ray; 'auto' or ray://host:port = join a cluster")
    workers: int = _f(2, ge=1)
    gpus_per_worker: float = _f(0.0, ge=0)
    cpus_per_worker: float = _f(1.0, gt=0)
    in_flight_per_worker: int = _f(2, ge=1, doc="units queued per worker so uploads overlap the next compute")
    max_attempts: int = _f(3, ge=1, doc="attempts per unit before it is recorded as failed")
    num_cpus: Optional[int] = _f(None, ge=1, doc="local Ray only: CPUs it may use")
    namespace: str = "prism-ray"


@dataclass
class StorageConfig:
    endpoint_url: Optional[str] = _f(None, doc="S3 endpoint; empty = AWS_ENDPOINT_URL or AWS")
    region: Optional[str] = None
    options: dict[str, Any] = _f(factory=dict, doc="extra fsspec options (never recorded in outputs)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    squeeze: SqueezeConfig = field(default_factory=SqueezeConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    # ---- derived views the stages use

    def teacher(self, name: str) -> TeacherSpec:
        for spec in self.teachers.models:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def recover_methods(self) -> dict[str, RecoverConfig]:
        """Every recover the run makes: the main one first, then the configured baselines."""
        methods = {self.recover.name: self.recover}
        methods.update(self._baseline_recovers)
        return methods

    def sets(self) -> list[str]:
        """Names of the image sets the run relabels and evaluates."""
        names = list(self.recover_methods())
        if self.baselines.random_real:
            names.append(RANDOM_REAL)
        return names

    def relabel_teachers(self) -> list[str]:
        return list(self.relabel.teachers) or [self.recover.primary]

    def relabel_epochs(self) -> int:
        return self.relabel.epochs or self.evaluate.epochs

    def to_dict(self, redact: bool = True) -> dict:
        """Plain dict of the resolved config; storage options are redacted so no secret is ever recorded."""
        out = dataclasses.asdict(self)
        out.pop("_baseline_recovers", None)
        if redact:
            out["storage"]["options"] = {k: "***" for k in out["storage"]["options"]}
        return out

    _baseline_recovers: dict = field(default_factory=dict, repr=False)


# ------------------------------------------------------------------------------------------------ loading


def preset_dir() -> Path:
    env = os.environ.get(PRESET_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "jobs" / "configs" / "presets"


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
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError("config", f"{p} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError("config", f"{p} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


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
    main = dataclasses.asdict(cfg.recover)
    for name, overrides in cfg.baselines.recover.items():
        path = f"baselines.recover.{name}"
        if not isinstance(overrides, dict):
            raise ConfigError(path, f"must be a mapping of recover keys, got {type(overrides).__name__}")
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


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or empty"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise ConfigError(path, f"got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
        return value
    if value is None:
        raise ConfigError(path, f"must be {_type_name(tp)}, got nothing")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be {_type_name(tp)}, got {value!r}")
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
            raise ConfigError(fpath, f"is required ({_type_name(hints[name])})")
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


# --------------------------------------------------------------------------------------- cross-field rules


def validate(cfg: Config) -> None:
    """Checks that span fields: names that must exist, pairs that must agree."""
    from prism_ray.algo.teachers import ARCHITECTURES  # late: keeps config importable without torch cost

    for i, stage in enumerate(cfg.run.stages):
        if stage not in STAGES:
            raise ConfigError(f"run.stages[{i}]", f"got {stage!r}; allowed: {', '.join(STAGES)}")
    if not cfg.run.output.strip():
        raise ConfigError("run.output", "must be a path or URI")

    d = cfg.data
    if d.dataset in ("image_folder", "parquet") and not d.train:
        raise ConfigError("data.train", f"is required for dataset {d.dataset!r} (URI of the training split)")
    for name in ("mean", "std"):
        v = getattr(d, name)
        if v is not None and len(v) != d.channels:
            raise ConfigError(f"data.{name}", f"needs {d.channels} values (data.channels), got {len(v)}")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise ConfigError("data.std", "values must be > 0")

    names = [t.name for t in cfg.teachers.models]
    for i, spec in enumerate(cfg.teachers.models):
        if names.index(spec.name) != i:
            raise ConfigError(f"teachers.models[{i}].name", f"{spec.name!r} is used twice; names must be unique")
        if spec.arch not in ARCHITECTURES:
            raise ConfigError(f"teachers.models[{i}].arch",
                              f"unknown architecture {spec.arch!r}; allowed: {', '.join(sorted(ARCHITECTURES))}")
        w = spec.weights
        if w.startswith("torchvision:") and not w.split(":", 1)[1]:
            raise ConfigError(f"teachers.models[{i}].weights", "torchvision: needs a weights name, e.g. "
                              "torchvision:IMAGENET1K_V1")

    def known(path: str, name: str) -> None:
        if name not in names:
            raise ConfigError(path, f"unknown teacher {name!r}; allowed (teachers.models names): {', '.join(names)}")

    for set_name, rc in cfg.recover_methods().items():
        base = "recover" if set_name == cfg.recover.name else f"baselines.recover.{set_name}"
        known(f"{base}.primary", rc.primary)
        for j, n in enumerate(rc.bn_pool):
            known(f"{base}.bn_pool[{j}]", n)
        for j, n in enumerate(rc.fixed):
            known(f"{base}.fixed[{j}]", n)
        _betas(rc.betas, f"{base}.betas")
        _scale_range(rc.crop_scale, f"{base}.crop_scale")
        if rc.schedule == "cyclic" and rc.iterations - rc.cyclic_step * (rc.cyclic_period - 1) < 1:
            raise ConfigError(f"{base}.iterations", f"cyclic schedule needs iterations > cyclic_step * "
                                                    f"(cyclic_period - 1) = {rc.cyclic_step * (rc.cyclic_period - 1)}")
    for name in cfg.baselines.recover:
        if name in (cfg.recover.name, RANDOM_REAL):
            raise ConfigError(f"baselines.recover.{name}", f"name {name!r} is taken; choose another set name")
    if cfg.recover.name == RANDOM_REAL:
        raise ConfigError("recover.name", f"{RANDOM_REAL!r} is reserved for the random real baseline")

    for j, n in enumerate(cfg.relabel.teachers):
        known(f"relabel.teachers[{j}]", n)
    _scale_range(cfg.relabel.crop_scale, "relabel.crop_scale")
    if cfg.evaluate.batch_size % cfg.relabel.mix_group:
        raise ConfigError("evaluate.batch_size", f"must be a multiple of relabel.mix_group ({cfg.relabel.mix_group}),"
                                                 f" got {cfg.evaluate.batch_size}")
    if cfg.relabel.epochs is not None and cfg.relabel.epochs < cfg.evaluate.epochs:
        raise ConfigError("relabel.epochs", f"must cover evaluate.epochs ({cfg.evaluate.epochs}), got "
                                            f"{cfg.relabel.epochs}")
    for j, arch in enumerate(cfg.evaluate.students):
        if arch not in ARCHITECTURES:
            raise ConfigError(f"evaluate.students[{j}]",
                              f"unknown architecture {arch!r}; allowed: {', '.join(sorted(ARCHITECTURES))}")
    if cfg.evaluate.diversity_network is not None:
        known("evaluate.diversity_network", cfg.evaluate.diversity_network)
    if cfg.ray.gpus_per_worker > 1 and cfg.ray.gpus_per_worker != int(cfg.ray.gpus_per_worker):
        raise ConfigError("ray.gpus_per_worker", "fractions are allowed only below 1 (e.g. 0.5), else whole GPUs")


def _betas(value: list[float], path: str) -> None:
    if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
        raise ConfigError(path, f"got {value!r}; allowed: two numbers in [0, 1)")


def _scale_range(value: list[float], path: str) -> None:
    if len(value) != 2 or not (0.0 < value[0] <= value[1] <= 1.0):
        raise ConfigError(path, f"got {value!r}; allowed: two numbers with 0 < first <= second <= 1")
