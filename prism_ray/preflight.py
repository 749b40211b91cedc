"""Checks the driver makes before anything is written to the run or any worker starts.

Everything that can be known from the config and storage is checked here, so that a user meets a missing
checkpoint, a teacher that does not fit the data, an incomplete image set or a foreign output folder as one
line on the terminal, not as a worker's traceback minutes into a run.
"""
from __future__ import annotations

import torch

from prism_ray.algo.teachers import ModelShape, TeacherError, build_model, torchvision_weights
from prism_ray.config import Config, ConfigError, check_data_facts
from prism_ray.lease import LEASE_PREFIX
from prism_ray.runs import RUN_RECORD
from prism_ray.stages.base import RunContext, Stage, StageError, classify_change, identity, stale_message
from prism_ray.storage import ShardStore, Storage
from prism_ray.teacher_pool import SQUEEZE_PREFIX, load_teacher, model_shape

# What a run writes at its top level: anything else in an output without run.json is somebody else's.
RUN_ENTRIES = {RUN_RECORD, LEASE_PREFIX, "data", "squeeze", "recover", "relabel", "evaluate", "report", "logs"}


def preflight(cfg: Config, storage: Storage, context: RunContext, stages: list[Stage], fresh: bool = False,
              all_stages: list[Stage] | None = None) -> list[str]:
    """Raise a one-line error (ConfigError, StageError, TeacherError, StorageError) for anything that would make
    `stages` fail for a reason the user must fix; nothing is left in the run (the writability probe is last).
    all_stages: every stage of the config (default `stages`), to check the upstream outputs `stages` read.
    Returns what the stages' own checks found, to show (an imported set's images per class)."""
    check_foreign_output(storage)
    recovering = any(s.kind == "recover" for s in stages)
    check_data_facts(cfg, context.num_classes, context.train_counts if recovering else None)
    by_prefix = {s.prefix: s for s in (all_stages or stages)}
    produced: set[str] = set()
    teachers: dict[str, str] = {}  # teacher name -> the first stage that loads it
    notes = [note for stage in stages if (note := stage.check_source(fresh=fresh))]
    for stage in stages:
        check_lineage(stage, by_prefix, produced, fresh)
        for name in stage.teachers_read():
            teachers.setdefault(name, stage.name)
        produced.add(stage.prefix)
        if not fresh:
            stage.refuse_changed_config()
    for name, stage_name in teachers.items():
        check_teacher(cfg, storage, context, name, stage_name, produced)
    shape = model_shape(cfg, context.num_classes)
    for i, spec in enumerate(cfg.teachers.models):
        if spec.name in teachers:
            check_resolution(spec.arch, shape, f"teachers.models[{i}] ({spec.name})")
    if any(s.kind == "evaluate" for s in stages):
        for j, arch in enumerate(cfg.evaluate.students):
            check_resolution(arch, shape, f"evaluate.students[{j}]")
    storage.check_writable()
    return notes


def check_lineage(stage: Stage, by_prefix: dict[str, Stage], produced: set[str], fresh: bool) -> None:
    """The upstream outputs `stage` would read are complete, made with what the current config says, and (unless
    `fresh`) the very ones its committed outputs were made from. Upstream stages that run earlier in this
    invocation (`produced`) are checked when `stage` binds to them, right before it runs."""
    storage = stage.storage
    messages = stage.inputs()
    for up in stage.upstream():
        if up in produced:
            continue
        store = ShardStore(storage, up)
        record = store.record()
        if up == SQUEEZE_PREFIX and (record is None or not store.complete()):
            continue  # check_teacher says what is missing, naming the teacher
        if record is None or not store.complete():
            raise StageError(f"{stage.name}: {messages.get(up, f'{up} is not complete; run it first')} "
                             f"({storage.uri(up)} is not complete)")
        upstream_stage = by_prefix.get(up)
        if upstream_stage is not None and record["config"] != upstream_stage.current_config():
            change = classify_change(record["config"], upstream_stage.current_config())
            rerun = f"prism-ray {upstream_stage.kind} CONFIG" + ("" if change.is_growth else " --fresh")
            raise StageError(f"{stage.name}: reads {up}, whose outputs were made with another config (differing: "
                             f"{', '.join(change.describe(with_growth=True)[:8])}); run that stage for this config first ({rerun})")
    if fresh:
        return
    own = stage.record()
    if not own or not own.get("upstream"):
        return
    if not ShardStore(storage, stage.prefix, generation=own["generation"]).committed():
        return
    changed = [up for up in stage.upstream() if up not in produced
               and own["upstream"].get(up) != identity(storage, up)]
    if changed:
        raise StageError(stale_message(stage, changed))


def check_foreign_output(storage: Storage) -> None:
    """The output is this run's, or empty: never another project's folder."""
    if not storage.exists(RUN_RECORD):
        foreign = sorted(n for n in storage.list("") if n not in RUN_ENTRIES and not n.startswith(".prism-ray-probe-"))
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise StageError(f"run.output {storage.uri()} already holds files that are not a prism-ray run ({shown}) "
                             f"and no {RUN_RECORD}; choose an empty or new location")


def check_teacher(cfg: Config, storage: Storage, context: RunContext, name: str, stage: str,
                  produced: set[str]) -> None:
    """The teacher's weights exist and fit its architecture and the data's classes and channels."""
    spec = cfg.teacher(name)
    shape = model_shape(cfg, context.num_classes)
    if spec.weights == "random":
        return
    if spec.weights == "squeeze" and SQUEEZE_PREFIX in produced:
        return  # an earlier stage of this invocation trains it
    if spec.weights.startswith("torchvision:"):
        weights = torchvision_weights(spec.arch, spec.weights.split(":", 1)[1])
        classes = len(weights.meta.get("categories", []))
        if classes and classes != context.num_classes:
            raise TeacherError(f"teacher {name!r} ({stage}): torchvision weights {spec.weights} have {classes} "
                               f"classes, the data has {context.num_classes}")
        return
    load_teacher(spec, shape, cfg, storage)  # reads the checkpoint and checks arch, classes, channels, shapes


def smallest_resolution(arch: str, shape: ModelShape, limit: int = 1024) -> int | None:
    """The smallest input side from shape.resolution up that `arch` accepts (None: none up to `limit`)."""
    def accepts(side: int) -> bool:
        at = ModelShape(shape.num_classes, shape.in_channels, side)
        # Small inputs run for real on the CPU (a few ms): the meta device's first forward in a process costs
        # ~0.7 CPU-seconds of set-up, more than every small network together. Larger ones on the meta device:
        # shapes only, no memory, no compute. Seeded: the driver's global RNG is left as it was.
        device = torch.device("cpu") if at.small else torch.device("meta")
        with device, torch.no_grad():
            model = build_model(arch, at, seed=0).eval()
            try:
                model(torch.zeros(2, shape.in_channels, side, side))
                return True
            except RuntimeError:
                return False

    if accepts(shape.resolution):
        return shape.resolution
    low, high = shape.resolution, shape.resolution * 2
    while not accepts(high):
        low, high = high, high * 2
        if high > limit:
            return None
    while high - low > 1:  # invariant: accepts(high), not accepts(low)
        mid = (low + high) // 2
        low, high = (low, mid) if accepts(mid) else (mid, high)
    return high


def check_resolution(arch: str, shape: ModelShape, where: str) -> None:
    """`arch` built for the data's resolution can run on it (small inputs vanish in deep downsampling)."""
    need = smallest_resolution(arch, shape)
    if need != shape.resolution:
        at_least = f"at least {need} px" if need else "a larger input"
        raise ConfigError("data.resolution", f"{shape.resolution} px is smaller than {arch} ({where}) accepts; it "
                                             f"needs {at_least}, or choose another architecture")
