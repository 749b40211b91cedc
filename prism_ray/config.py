"""The run's vocabulary: typed dataclass configs and the rules that span their fields.

Every error is a `ConfigError` that names the offending field (``recover.lr``) and what is allowed, so the
CLI can print one line and exit 2 instead of a traceback. Range and choice checks live next to the field
they guard (``metadata``) so the error text and the rule cannot drift apart; `config_loader` reads YAML
files and `--set` overrides into these classes and applies the checks.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

STAGES = ("squeeze", "recover", "relabel", "evaluate")
RANDOM_REAL = "random_real"
# Set and teacher names become storage paths and unit ids ("<set>--<student>--seed<n>"): letters, digits, '_',
# '.', '-', starting with a letter or digit, never '--' or '..', so that no name reaches outside the run or
# splits ambiguously.
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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
    """The run: its name, where it lives, its root seed and which stages `prism-ray run` executes."""

    name: str = _f("prism-run", doc="run name, used in logs and actor names")
    output: str = _f("runs/prism-run", doc="run URI: local path, file://, s3://bucket/prefix")
    seed: int = _f(0, ge=0, doc="root of every random draw of the run")
    stages: list[str] = _f(factory=lambda: list(STAGES), nonempty=True, doc="stages `prism-ray run` executes")
    lease_seconds: float = _f(60.0, gt=0, doc="one driver per run: the driver renews its lease 6 times per this "
                                              "period; another driver takes over a lease not renewed for this long")


@dataclass
class DataConfig:
    """The real data: the training split (squeeze, recover, random real) and the validation split (evaluate)."""

    dataset: Literal["fashion_mnist", "image_folder", "parquet"] = _f(
        "fashion_mnist", doc="fashion_mnist (IDX files), image_folder (class folders of images) or parquet (an image "
                             "and a label column)")
    root: str = _f("/usr/share/datasets/fashion-mnist", doc="fashion_mnist: folder or URI of the IDX .gz files")
    train: Optional[str] = _f(None, doc="image_folder / parquet: URI of the training split")
    val: Optional[str] = _f(None, doc="image_folder / parquet: URI of the validation split")
    channels: Literal[1, 3] = _f(1, doc="image channels the networks take (images are converted to it)")
    resolution: int = _f(28, ge=8, le=1024, doc="side in pixels of every image the networks see")
    resize: Optional[int] = _f(
        None, ge=8, doc="shorter side resized to this (antialiased bilinear), then a centre crop to data.resolution, "
                        "for real images (validation, real init, random real); empty = per data set: 256 for "
                        "image_folder / parquet at resolution 224 (the ImageNet protocol Resize(256) + "
                        "CenterCrop(224) of the PRISM and SRe2L code), data.resolution otherwise (no margin)")
    mean: Optional[list[float]] = _f(None, doc="per-channel normalization mean; empty = the data set's own")
    std: Optional[list[float]] = _f(None, doc="per-channel normalization std; empty = the data set's own")
    classes: Optional[int] = _f(None, ge=1, doc="use only the first N classes (small runs and tests)")
    max_per_class: Optional[int] = _f(None, ge=1, doc="cap on training images per class (squeeze)")
    max_val: Optional[int] = _f(None, ge=1, doc="cap on validation images (evaluation), first N")
    image_column: str = _f("image", doc="parquet: column holding the encoded image bytes")
    label_column: str = _f("label", doc="parquet: column holding the integer class")
    index: Optional[str] = _f(None, doc="folder URI holding train-index.parquet / val-index.parquet (made by "
                                        "`prism-ray index`): nothing is listed; empty = list once into RUN/data")
    verify: Literal["auto", True, False] = _f(
        "auto", doc="decode every image when the data is listed: true, false, or auto (splits of at most 20,000 "
                    "images)")


IMAGENET_PROTOCOL = (224, 256)  # (resolution, resize) of the standard ImageNet evaluation crop


def resolved_resize(d: DataConfig) -> int:
    """The shorter side real images are resized to before the centre crop (see DataConfig.resize)."""
    if d.resize is not None:
        return d.resize
    if d.dataset in ("image_folder", "parquet") and d.resolution == IMAGENET_PROTOCOL[0]:
        return IMAGENET_PROTOCOL[1]
    return d.resolution


@dataclass
class TeacherSpec:
    """One teacher of the pool (an item of teachers.models)."""

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
    """The teacher pool every stage draws from, by name."""

    models: list[TeacherSpec] = _f(factory=_default_teachers, nonempty=True,
                                   doc="the teachers: a list of {name, arch, weights} (teachers.models[] below)")
    cache_dir: Optional[str] = _f(None, doc="node-local cache of torchvision weights and checkpoints")


@dataclass
class SqueezeConfig:
    """Training the teachers whose weights are `squeeze`: SGD with Nesterov momentum, a one-cycle schedule."""

    epochs: float = _f(1.0, gt=0, doc="passes over the (capped) training set; fractions allowed")
    batch_size: int = _f(128, ge=1, doc="training batch")
    lr: float = _f(0.05, gt=0, doc="peak SGD learning rate")
    momentum: float = _f(0.9, ge=0, lt=1, doc="SGD momentum")
    weight_decay: float = _f(5e-4, ge=0, doc="SGD weight decay")
    label_smoothing: float = _f(0.0, ge=0, lt=1, doc="label smoothing of the cross-entropy")


@dataclass
class RecoverConfig:
    """Synthesizing a set: the PRISM objective, its teacher selection, optimizer, schedule and encoding."""

    preset: Optional[str] = _f(None, doc="named preset (prism_ray/presets/recover); explicit keys win")
    name: str = _f("prism", doc="name of the synthetic set this recover produces")
    primary: str = _f("convnet", doc="teacher whose logits give the CE loss")
    bn_pool: Optional[list[str]] = _f(None, doc="teachers the extra BN teachers are drawn from; empty = every "
                                                "teacher but the primary")
    selection: Literal["pre", "intra", "fixed"] = _f(
        "pre", doc="extra BN teachers drawn once (pre; per draw_per), anew every iteration (intra), or the `fixed` list")
    draw_per: Literal["shard", "ipc"] = _f(
        "ipc", doc="what one teacher draw covers: each shard its own, or every shard of one IPC index the same "
                     "(the reference draws once per IPC index for all its class batches)")
    slots: int = _f(3, ge=0, doc="draws of extra BN teachers, each filled with slot_prob")
    slot_prob: float = _f(0.5, ge=0, le=1, doc="probability that a slot is filled")
    fixed: list[str] = _f(factory=list, doc="selection=fixed: extra BN teachers used every step")
    bn_average: Literal["bn_only", "reference"] = _f(
        "reference", doc="divisor of the summed BN losses: reference = every drawn teacher, BN-free ones (alexnet) "
                       "included, as the authors' count_aux; bn_only = only teachers with BN layers")
    bn_normalize: bool = _f(False, doc="divide each teacher's BN loss by its detached value when first used")
    r_bn: float = _f(0.01, ge=0, doc="weight of the BN statistic loss beside the primary's cross-entropy")
    first_bn_multiplier: float = _f(10.0, ge=0, doc="extra weight of each teacher's first BN layer")
    init: Literal["real", "noise"] = _f("real", doc="start IPC index k from the k-th real image of each class, or "
                                                   "from Gaussian noise")
    lr: float = _f(0.05, gt=0, doc="Adam learning rate on the pixels (cosine per step, no warm-up)")
    betas: list[float] = _f(factory=lambda: [0.5, 0.9], doc="Adam betas: two numbers in [0, 1)")
    iterations: int = _f(4000, ge=1, doc="optimization steps per shard (the base of the cyclic schedule)")
    schedule: Literal["cyclic", "flat"] = _f("cyclic", doc="iterations per IPC index: cyclic (see cyclic_step) or "
                                                          "flat (always `iterations`)")
    cyclic_step: int = _f(500, ge=0, doc="cyclic: iterations = base - cyclic_step * (ipc % cyclic_period)")
    cyclic_period: int = _f(8, ge=1, doc="cyclic: the period of the IPC index pattern")
    jitter: int = _f(32, ge=0, doc="random roll of 0..jitter pixels per step")
    crop_scale: list[float] = _f(factory=lambda: [0.08, 1.0], doc="area range of the random resized crop shared by "
                                                                  "the batch each step")
    ipc: int = _f(50, ge=1, doc="images per class")
    class_group: int = _f(100, ge=1, doc="classes per cross-class batch (shard)")
    image_format: Literal["jpeg", "png"] = _f("jpeg", doc="encoding of the stored images")
    jpeg_quality: int = _f(75, ge=1, le=100, doc="jpeg: Pillow quality")
    precision: Literal["fp32", "bf16"] = _f(
        "fp32", doc="teacher passes: fp32 (the reference) or bf16 autocast with bf16 copies of conv/linear weights "
                    "(BN statistics and losses in fp32); bf16 applies on any device (slow on CPUs without bf16 "
                    "instructions). docs/recover.md has what bf16 was measured to change")
    channels_last: bool = _f(True, doc="NHWC teachers and images: faster on GPUs and CPUs; the same computation, "
                                       "summed in another order")


# Keys a baseline recover inherits from the main recover whatever its preset says: the set must be
# comparable (same IPC, same primary, same encoding), only the method differs.
RECOVER_SHARED_KEYS = ("ipc", "class_group", "primary", "image_format", "jpeg_quality", "precision",
                       "channels_last")


@dataclass
class ImportedSetConfig:
    """An image set made elsewhere, evaluated like the run's own (docs/sets.md has the rules)."""

    uri: str = _f(doc="where the set is: an ImageFolder tree (class folders named like the data's classes, or "
                      "numbered new003 / class003 / 003 as SRe2L, PRISM and RDED write them) or Parquet (a file, or a "
                      "folder of .parquet files)")
    format: Literal["auto", "image_folder", "parquet"] = _f(
        "auto", doc="auto: parquet when the URI is a .parquet file or a folder of .parquet files, else image_folder")
    ipc: Optional[int] = _f(None, ge=1, doc="images per class the set declares: a class with more is refused; "
                                            "empty = recover.ipc")
    image_column: str = _f("image", doc="parquet: the image column (bytes, or a struct of bytes and path as Hugging "
                                        "Face writes it)")
    label_column: str = _f("label", doc="parquet: the label column (class ids, or ClassLabel names in the Hugging "
                                        "Face schema metadata)")
    method: str = _f("", doc="what made the set, for the report and export cards (e.g. 'SRe2L release'); "
                             "changes nothing")


@dataclass
class BaselinesConfig:
    """The sets the method is compared with under the same relabel and evaluate protocol."""

    random_real: bool = _f(True, doc="a seeded random real subset with the same IPC")
    recover: dict[str, dict] = _f(factory=dict, doc="extra recover methods: name -> recover overrides (preset...)")
    imported: dict[str, ImportedSetConfig] = _f(
        factory=dict, doc="sets made elsewhere, by name: indexed, checked and committed by the recover stage, then "
                          "relabelled and evaluated like the run's own sets")


@dataclass
class RelabelConfig:
    """FKD-style soft labels for every epoch of student training (crops, flips, CutMix, teacher logits)."""

    mode: Literal["stored", "live"] = _f("stored", doc="write labels as Parquet shards (stored) or run the teachers "
                                                      "during student training (live)")
    teachers: list[str] = _f(factory=list, doc="soft-label teachers (ensemble); empty = the recover primary")
    epochs: Optional[int] = _f(None, ge=1, doc="epochs of labels; empty = evaluate.epochs")
    mix_group: int = _f(50, ge=1, doc="images that share one CutMix box; student batches hold whole groups")
    crop_scale: list[float] = _f(factory=lambda: [0.25, 1.0], doc="area range of each image's random resized crop")
    cutmix: bool = _f(True, doc="CutMix within each mix group")
    topk: int = _f(0, ge=0, doc="store only the top-k logits (0 = all, fp16)")
    ensemble: Literal["mean_norm", "primary_weighted"] = _f(
        "mean_norm", doc="several teachers: logits rescaled to their mean norm then averaged (PRISM R18 scripts), "
                         "or half primary, half the others (PRISM R50/R101 scripts)")
    epochs_per_shard: int = _f(10, ge=1, doc="epochs of labels per stored Parquet shard")


@dataclass
class EvaluateConfig:
    """Students trained on every set with its soft labels and scored on the real validation split."""

    recipe: Optional[str] = _f(None, doc="named preset (prism_ray/presets/evaluate)")
    students: list[str] = _f(factory=lambda: ["convnet"], nonempty=True,
                             doc="student architectures (`prism-ray teachers` lists them), each trained on every set")
    seeds: list[int] = _f(factory=lambda: [0, 1, 2], nonempty=True,
                          doc="student seeds; seed n starts from the same weights on every set (paired comparisons)")
    epochs: int = _f(300, ge=1, doc="student training epochs")
    batch_size: int = _f(50, ge=1, doc="student batch, a multiple of relabel.mix_group")
    optimizer: Literal["adamw", "sgd"] = _f("adamw", doc="AdamW, or SGD with momentum 0.9")
    lr: float = _f(1e-3, gt=0, doc="peak learning rate")
    weight_decay: float = _f(0.01, ge=0, doc="weight decay")
    no_decay_norm_bias: bool = _f(True, doc="no weight decay on norm layers and biases")
    loss: Literal["mse_ce", "kl"] = _f("mse_ce", doc="MSE to the teacher logits + ce_weight x cross-entropy (PRISM), "
                                                    "or KL at temperature T (SRe2L)")
    schedule: Literal["cosine", "cosine_epoch", "prism_reference"] = _f(
        "prism_reference", doc="learning-rate schedule: prism_reference, the PRISM validate code's per-epoch "
                               "stretched cosine then linear decay; cosine_epoch, a cosine stepped once per epoch "
                               "(SRe2L's validate code); cosine, a cosine per optimizer step")
    accumulation_steps: int = _f(
        2, ge=1, doc="micro-batches per optimizer step: each batch runs as this many forward/backward passes of "
                     "batch_size / accumulation_steps images (BN statistics over a micro-batch), each loss divided "
                     "by accumulation_steps; the PRISM and SRe2L references use 2")
    precision: Literal["fp32", "bf16"] = _f(
        "fp32", doc="student forward pass: fp32 (the references: autocast off) or bf16 autocast with the loss in "
                    "fp32 (any device; on a CPU without bf16 instructions it is slower, there for measurement)")
    eval_every: int = _f(
        10, ge=0, doc="score on the validation set after epoch e (0-based) when e % eval_every == 0 and after the "
                     "last epoch, as the references do with 10; keeps best and final top-1/top-5. 0 = only after "
                     "the last epoch")
    ce_weight: float = _f(0.1, ge=0, doc="mse_ce: weight of the hard-label cross-entropy")
    temperature: float = _f(4.0, gt=0, doc="kl: softmax temperature")
    checkpoint_every: int = _f(50, ge=1, doc="epochs between checkpoints written to the run")
    diversity_network: Optional[str] = _f(None, doc="teacher whose features measure diversity; empty = primary")
    val_batch_size: int = _f(500, ge=1, doc="batch for scoring and diversity features")


@dataclass
class RayConfig:
    """Where the work runs: a local Ray or a cluster, and the shape and number of workers."""

    address: Optional[str] = _f(None, doc="empty = start a local Ray; 'auto' or ray://host:port = join a cluster")
    workers: Union[int, Literal["auto"]] = _f(
        2, doc="a number (those that cannot be placed wait), or 'auto': one per free slot of the worker's shape, "
               "growing as nodes join, up to max_workers")
    max_workers: Optional[int] = _f(None, ge=1, doc="workers: auto only: at most this many (empty = the units left)")
    gpus_per_worker: float = _f(0.0, ge=0, doc="GPUs each worker reserves (fractions below 1 share a GPU)")
    cpus_per_worker: float = _f(1.0, gt=0, doc="CPUs each worker reserves; also its torch threads")
    memory_per_worker: Optional[float] = _f(None, gt=0, doc="GiB of host memory each worker reserves (Ray 'memory')")
    in_flight_per_worker: int = _f(2, ge=1, doc="units queued per worker so uploads overlap the next compute")
    max_attempts: int = _f(3, ge=1, doc="attempts per unit before it is recorded as failed")
    num_cpus: Optional[int] = _f(None, ge=1, doc="local Ray only: CPUs it may use")
    namespace: str = _f("prism-ray", doc="Ray namespace of the run's actors")

    def worker_shape(self) -> dict[str, float]:
        """The resources one worker reserves, as Ray names them (what a free slot must hold)."""
        shape = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            shape["GPU"] = self.gpus_per_worker
        if self.memory_per_worker:
            shape["memory"] = self.memory_per_worker * 2**30
        return shape


@dataclass
class StorageConfig:
    """How s3:// URIs are reached (local paths need nothing)."""

    endpoint_url: Optional[str] = _f(None, doc="S3 endpoint; empty = AWS_ENDPOINT_URL or AWS")
    region: Optional[str] = _f(None, doc="S3 region; empty = the environment's")
    options: dict[str, Any] = _f(factory=dict, doc="extra fsspec options (never recorded in outputs)")
    allow_unconditional_create: bool = _f(
        False, doc="run on a store that does not honour create-if-absent (S3 If-None-Match), which the commits and "
                   "the run's lease rely on; first writer wins is then not guaranteed")


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
        """Names of the image sets the run relabels and evaluates: its recovers, random real, imported sets."""
        names = list(self.recover_methods())
        if self.baselines.random_real:
            names.append(RANDOM_REAL)
        return names + list(self.baselines.imported)

    def imported_ipc(self, name: str) -> int:
        """The IPC an imported set declares (its own `ipc`, else the run's)."""
        return self.baselines.imported[name].ipc or self.recover.ipc

    def relabel_teachers(self) -> list[str]:
        return list(self.relabel.teachers) or [self.recover.primary]

    def relabel_epochs(self) -> int:
        return self.relabel.epochs or self.evaluate.epochs

    def to_dict(self, redact: bool = True) -> dict:
        """Plain dict of the resolved config (baseline recovers with their presets applied); storage options
        are redacted so no secret is ever recorded. Loading it again gives the same config."""
        out = dataclasses.asdict(self)
        resolved = out.pop("_baseline_recovers", None) or {}
        out["baselines"]["recover"] = {name: {k: v for k, v in rc.items() if k != "name"}
                                       for name, rc in resolved.items()}
        if redact:
            from prism_ray.redaction import redact as redact_uris  # credentials inside any URI
            out["storage"]["options"] = {k: "***" for k in out["storage"]["options"]}
            out = redact_uris(out)
        return out

    _baseline_recovers: dict = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------- cross-field rules


def validate(cfg: Config) -> None:
    """Checks that span fields: names that must exist, pairs that must agree."""
    from prism_ray.algo.teachers import ARCHITECTURES  # late: keeps config importable without torch cost

    for i, stage in enumerate(cfg.run.stages):
        if stage not in STAGES:
            raise ConfigError(f"run.stages[{i}]", f"got {stage!r}; allowed: {', '.join(STAGES)}")
    if not cfg.run.output.strip():
        raise ConfigError("run.output", "must be a path or URI")
    from prism_ray.redaction import redact_uri
    for path, uri in (("run.output", cfg.run.output), ("data.root", cfg.data.root), ("data.train", cfg.data.train),
                      ("data.val", cfg.data.val), ("data.index", cfg.data.index)):
        if uri and "://" in uri and uri.split("://", 1)[0].lower() in ("s3", "s3a", "gs", "gcs", "az", "abfs") \
                and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
            raise ConfigError(path, f"{redact_uri(uri)} holds credentials (user:password@); prism-ray takes storage "
                                    f"credentials from the environment (AWS_ACCESS_KEY_ID, ...) or storage.options, "
                                    f"never from a URI, where they would be logged")

    d = cfg.data
    if d.dataset in ("image_folder", "parquet") and not d.train:
        raise ConfigError("data.train", f"is required for dataset {d.dataset!r} (URI of the training split)")
    for name in ("mean", "std"):
        v = getattr(d, name)
        if v is not None and len(v) != d.channels:
            raise ConfigError(f"data.{name}", f"needs {d.channels} values (data.channels), got {len(v)}")
    if d.std is not None and any(s <= 0 for s in d.std):
        raise ConfigError("data.std", "values must be > 0")
    if d.resize is not None and d.resize < d.resolution:
        raise ConfigError("data.resize", f"got {d.resize}; the shorter side must be at least data.resolution "
                                         f"({d.resolution}) for the centre crop")

    names = [t.name for t in cfg.teachers.models]
    for i, spec in enumerate(cfg.teachers.models):
        _plain_name(spec.name, f"teachers.models[{i}].name", "a teacher name")
        if names.index(spec.name) != i:
            raise ConfigError(f"teachers.models[{i}].name", f"{spec.name!r} is used twice; names must be unique")
        if spec.arch not in ARCHITECTURES:
            raise ConfigError(f"teachers.models[{i}].arch",
                              f"unknown architecture {spec.arch!r}; allowed: {', '.join(sorted(ARCHITECTURES))}")
        if spec.weights.startswith("torchvision:"):
            _torchvision_weights(spec, d, f"teachers.models[{i}].weights")

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
    _set_name(cfg.recover.name, "recover.name")
    for name in cfg.baselines.recover:
        _set_name(name, f"baselines.recover.{name}")
        if name in (cfg.recover.name, RANDOM_REAL):
            raise ConfigError(f"baselines.recover.{name}", f"name {name!r} is taken; choose another set name")
    if cfg.recover.name == RANDOM_REAL:
        raise ConfigError("recover.name", f"{RANDOM_REAL!r} is reserved for the random real baseline")
    for name, spec in cfg.baselines.imported.items():
        path = f"baselines.imported.{name}"
        _set_name(name, path)
        # 'real' names the real-data row of the diversity table (stages/evaluate.py REAL)
        if name in cfg.recover_methods() or name in (RANDOM_REAL, "real"):
            raise ConfigError(path, f"name {name!r} is taken by another set; choose another set name")
        if not spec.uri.strip():
            raise ConfigError(f"{path}.uri", "must be a path or URI of the set")

    for j, n in enumerate(cfg.relabel.teachers):
        known(f"relabel.teachers[{j}]", n)
    _scale_range(cfg.relabel.crop_scale, "relabel.crop_scale")
    if cfg.evaluate.batch_size % cfg.relabel.mix_group:
        raise ConfigError("evaluate.batch_size", f"must be a multiple of relabel.mix_group ({cfg.relabel.mix_group}),"
                                                 f" got {cfg.evaluate.batch_size}")
    if cfg.evaluate.batch_size % cfg.evaluate.accumulation_steps:
        raise ConfigError("evaluate.accumulation_steps",
                          f"must divide evaluate.batch_size ({cfg.evaluate.batch_size}) into equal micro-batches, got "
                          f"{cfg.evaluate.accumulation_steps}")
    if cfg.relabel.epochs is not None and cfg.relabel.epochs < cfg.evaluate.epochs:
        raise ConfigError("relabel.epochs", f"must cover evaluate.epochs ({cfg.evaluate.epochs}), got "
                                            f"{cfg.relabel.epochs}")
    for j, arch in enumerate(cfg.evaluate.students):
        if arch not in ARCHITECTURES:
            raise ConfigError(f"evaluate.students[{j}]",
                              f"unknown architecture {arch!r}; allowed: {', '.join(sorted(ARCHITECTURES))}")
    if cfg.evaluate.diversity_network is not None:
        known("evaluate.diversity_network", cfg.evaluate.diversity_network)
    if cfg.ray.workers != "auto" and cfg.ray.workers < 1:
        raise ConfigError("ray.workers", f"got {cfg.ray.workers!r}; allowed: >= 1 or 'auto'")
    if cfg.ray.max_workers is not None and cfg.ray.workers != "auto":
        raise ConfigError("ray.max_workers", "applies only with ray.workers: auto (a fixed ray.workers is the count)")
    if cfg.ray.gpus_per_worker > 1 and cfg.ray.gpus_per_worker != int(cfg.ray.gpus_per_worker):
        raise ConfigError("ray.gpus_per_worker", "fractions are allowed only below 1 (e.g. 0.5), else whole GPUs")
    known_classes = cfg.data.classes or (10 if d.dataset == "fashion_mnist" else None)
    if known_classes is not None:
        check_data_facts(cfg, known_classes)


def check_data_facts(cfg: Config, num_classes: int, class_counts: Optional[list[int]] = None) -> None:
    """Rules that need the data: the class count (known from the config for some data sets, else from the data
    index) and, when recover runs, the training images per class (`class_counts`)."""
    if cfg.relabel.topk > num_classes:
        raise ConfigError("relabel.topk", f"got {cfg.relabel.topk} but the data has {num_classes} classes; allowed: "
                                          f"0 (all logits) to {num_classes}")
    if not class_counts:
        return
    smallest = min(range(len(class_counts)), key=lambda c: class_counts[c])
    needs_real = [n for n, rc in cfg.recover_methods().items() if rc.init == "real"]
    if cfg.recover.ipc > class_counts[smallest] and (needs_real or cfg.baselines.random_real):
        why = f"{needs_real[0]} starts from real images" if needs_real else "the random_real baseline samples them"
        raise ConfigError("recover.ipc", f"got {cfg.recover.ipc} but class {smallest} has only "
                                         f"{class_counts[smallest]} training images ({why}); lower recover.ipc, or "
                                         f"raise data.max_per_class")


def _set_name(name: str, path: str) -> None:
    _plain_name(name, path, "a set name")


def _plain_name(name: Any, path: str, what: str) -> None:
    """Names that become storage keys and unit ids: no '/', no '..', nothing that splits a unit id."""
    if not isinstance(name, str) or not SET_NAME.fullmatch(name) or "--" in name or ".." in name:
        raise ConfigError(path, f"got {name!r}; {what} is 1-64 letters, digits, '_', '.' or '-', starting with a "
                                f"letter or digit, without '--' or '..' (it becomes a storage path)")


def _torchvision_weights(spec: TeacherSpec, data: DataConfig, path: str) -> None:
    """torchvision weights must exist for the architecture and fit the data (3 channels, ImageNet-sized inputs)."""
    from prism_ray.algo.teachers import SMALL_INPUT_MAX, TeacherError, torchvision_weights

    name = spec.weights.split(":", 1)[1]
    try:
        torchvision_weights(spec.arch, name)
    except TeacherError as e:
        raise ConfigError(path, str(e)) from None
    if data.channels != 3 or data.resolution <= SMALL_INPUT_MAX:
        raise ConfigError(path, f"torchvision weights are for 3-channel images above {SMALL_INPUT_MAX} px; the data "
                                f"is {data.channels} channel(s) at {data.resolution} px (data.channels, "
                                f"data.resolution): train this teacher with weights: squeeze instead")


def _betas(value: list[float], path: str) -> None:
    if len(value) != 2 or not all(0.0 <= b < 1.0 for b in value):
        raise ConfigError(path, f"got {value!r}; allowed: two numbers in [0, 1)")


def _scale_range(value: list[float], path: str) -> None:
    if len(value) != 2 or not (0.0 < value[0] <= value[1] <= 1.0):
        raise ConfigError(path, f"got {value!r}; allowed: two numbers with 0 < first <= second <= 1")
