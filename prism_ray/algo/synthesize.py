"""PRISM recover: one call synthesizes one shard, a cross-class batch (one IPC index x a group of classes).

Per step t, on one shared random view v_t(x) of the batch x (crop, flip, roll; see augment.py):

    loss_t = CE(primary(v_t(x)), y) + r_bn * average_{teachers T in S_t} BN_T(v_t(x))

S_t is the primary plus the extra BN teachers of step t (selection.py); the primary's BN statistics come
from the same forward pass as its logits, so no network runs twice per step, and a teacher without BN
layers is never run (its BN loss is nothing; it only counts in the divisor with bn_average=reference).
Adam with a cosine learning rate updates x, which is then clamped to valid pixels.

Everything random in a shard comes from torch generators seeded by the shard's seed, so the same shard
gives the same images and bytes on CPU however often it is rerun. Pure torch: the caller loads teachers,
reads initial images and writes the outputs.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prism_ray.algo.augment import apply_view, draw_view
from prism_ray.algo.bn_loss import BNStatisticHooks, average_bn_loss
from prism_ray.algo.encode import encode_images, file_extension
from prism_ray.algo.schedule import cosine_lr, iterations_for
from prism_ray.algo.seeding import generator
from prism_ray.algo.selection import TeacherSelection
from prism_ray.algo.teachers import freeze

if TYPE_CHECKING:  # types only: the engine needs neither the config loader nor the data/storage layer
    from prism_ray.config import RecoverConfig
    from prism_ray.data.base import Normalization

HISTORY_POINTS = 50  # loss history samples kept per shard (plus the last step)
_SCALE_FLOOR = 1e-12  # bn_normalize: a teacher whose first BN loss is ~0 must not divide by zero


@dataclass(frozen=True)
class ShardSpec:
    """One cross-class batch: IPC index `ipc_index` of every class in `class_ids`, with its own seed."""

    shard_id: str
    ipc_index: int
    class_ids: tuple[int, ...]
    seed: int

    def __post_init__(self):
        object.__setattr__(self, "class_ids", tuple(int(c) for c in self.class_ids))
        if not self.class_ids:
            raise ValueError(f"shard {self.shard_id}: no classes")


@dataclass
class ImageRecord:
    """One synthetic image's manifest columns, plain Python types (a Parquet row).

    loss_ce is this image's cross-entropy and loss_bn the shard's averaged BN loss (without r_bn), both at
    the last iteration, before its update; seconds is the shard's wall time divided by its images, so a
    sum over records gives the compute spent.
    """

    class_id: int
    ipc_index: int
    seed: int
    primary_teacher: str
    bn_teachers: list[str]
    bn_teacher_usage: str
    iterations: int
    loss_ce: float
    loss_bn: float
    seconds: float

    def to_row(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ShardResult:
    """The images of one shard (normalized CPU tensor and encoded files, in class_ids order) and their records."""

    spec: ShardSpec
    images: torch.Tensor
    encoded: list[bytes]
    extension: str
    records: list[ImageRecord]
    iterations: int
    bn_teacher_usage: dict[str, int]
    seconds: float
    history: dict[str, list] = field(default_factory=dict)  # iteration, loss, loss_ce, loss_bn

    def rows(self) -> list[dict]:
        return [r.to_row() for r in self.records]


def initial_images(spec: ShardSpec, cfg: "RecoverConfig", init_images: Optional[torch.Tensor],
                   shape: Optional[Sequence[int]]) -> torch.Tensor:
    """The starting batch: a copy of the given real images (init real) or seeded N(0, 1) noise in normalized space."""
    n = len(spec.class_ids)
    if cfg.init == "real":
        if init_images is None:
            raise ValueError(f"shard {spec.shard_id}: init 'real' needs the real images of ipc {spec.ipc_index} "
                             f"for its {n} classes (init_images)")
        if init_images.dim() != 4 or init_images.shape[0] != n:
            raise ValueError(f"shard {spec.shard_id}: init_images must be ({n}, C, H, W), got "
                             f"{tuple(init_images.shape)}")
        return init_images.detach().to(torch.float32).clone()
    if cfg.init != "noise":
        raise ValueError(f"init must be 'real' or 'noise', got {cfg.init!r}")
    chw = tuple(init_images.shape[1:]) if init_images is not None else tuple(shape or ())
    if len(chw) != 3:
        raise ValueError(f"shard {spec.shard_id}: init 'noise' needs the image shape (C, H, W) (shape=...)")
    return torch.randn((n, *chw), generator=generator(spec.seed, "init"))


def synthesize_shard(pool: Mapping[str, nn.Module], spec: ShardSpec, cfg: "RecoverConfig",
                     normalization: "Normalization", init_images: Optional[torch.Tensor] = None,
                     device: torch.device | str = "cpu", *, shape: Optional[Sequence[int]] = None) -> ShardResult:
    """Synthesize the images of `spec` with the teachers of `pool` (name -> model on `device`).

    init_images: (N, C, H, W) normalized real images, N = len(spec.class_ids), for init 'real'; for init
    'noise', `shape` (C, H, W) or init_images gives the size. The models used are frozen and set to eval
    mode (and to channels_last on CUDA when cfg.channels_last) in place.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    selection = TeacherSelection(cfg.primary, cfg.selection, pool=cfg.bn_pool, slots=cfg.slots,
                                 prob=cfg.slot_prob, fixed=cfg.fixed, generator=generator(spec.seed, "teachers"))
    names = selection.candidates()
    missing = [n for n in names if n not in pool]
    if missing:
        raise KeyError(f"shard {spec.shard_id}: teacher(s) {', '.join(missing)} not in the loaded pool "
                       f"({', '.join(pool) or 'empty'})")
    iterations = iterations_for(spec.ipc_index, cfg.iterations, cfg.schedule, cfg.cyclic_step, cfg.cyclic_period)
    on_cuda = device.type == "cuda"
    channels_last = on_cuda and cfg.channels_last
    teachers = {n: freeze(pool[n]) for n in names}
    x = initial_images(spec, cfg, init_images, shape).to(device)
    if channels_last:  # NHWC lets cuDNN use its fastest (tensor-core) convolution kernels
        teachers = {n: m.to(memory_format=torch.channels_last) for n, m in teachers.items()}
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    low, high = normalization.bounds(x.detach())
    targets = torch.tensor(spec.class_ids, device=device)
    optimizer = torch.optim.Adam([x], lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=1e-8)
    views = generator(spec.seed, "augment")
    height, width = x.shape[-2:]
    scales: dict[str, torch.Tensor] = {}
    usage: Counter = Counter()
    ce_history, bn_history = [], []
    zero = torch.zeros((), device=device)

    hooks = {n: BNStatisticHooks(teachers[n], cfg.first_bn_multiplier) for n in names}
    try:
        for step in range(iterations):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, iterations, cfg.lr)
            step_teachers = selection.next_step()
            usage.update(step_teachers)
            view = draw_view(views, height, width, cfg.crop_scale, cfg.jitter)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda and cfg.amp):
                x_view = apply_view(x, view)
                logits = teachers[cfg.primary](x_view)
                per_teacher: dict[str, Optional[torch.Tensor]] = {cfg.primary: hooks[cfg.primary].pop_loss()}
                for name in step_teachers[1:]:
                    if hooks[name].has_bn:
                        teachers[name](x_view)  # run for its BN hooks only; its logits are not used
                    per_teacher[name] = hooks[name].pop_loss()
            ce_each = F.cross_entropy(logits.float(), targets, reduction="none")
            ce = ce_each.mean()
            if cfg.bn_normalize:
                per_teacher = {n: _normalized(n, v, scales) for n, v in per_teacher.items()}
            bn = average_bn_loss(per_teacher, cfg.bn_average)
            bn = zero if bn is None else bn
            loss = ce + cfg.r_bn * bn
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                x.clamp_(low, high)
            ce_history.append(ce.detach())
            bn_history.append(bn.detach())
    finally:
        for h in hooks.values():
            h.remove()

    # the only device -> host copies of the shard
    ce_curve = torch.stack(ce_history).cpu()
    bn_curve = torch.stack(bn_history).cpu()
    final_ce = ce_each.detach().float().cpu().tolist()
    images = x.detach().to("cpu", torch.float32).contiguous()
    encoded = encode_images(images, normalization, cfg.image_format, cfg.jpeg_quality)
    seconds = time.perf_counter() - t0

    used = [n for n in names if usage[n]]
    usage_map = {n: int(usage[n]) for n in used}
    usage_json = json.dumps(usage_map, sort_keys=True)
    final_bn = float(bn_curve[-1])
    records = [ImageRecord(class_id=c, ipc_index=spec.ipc_index, seed=spec.seed, primary_teacher=cfg.primary,
                           bn_teachers=list(used), bn_teacher_usage=usage_json, iterations=iterations,
                           loss_ce=float(final_ce[i]), loss_bn=final_bn, seconds=seconds / len(spec.class_ids))
               for i, c in enumerate(spec.class_ids)]
    return ShardResult(spec=spec, images=images, encoded=encoded, extension=file_extension(cfg.image_format),
                       records=records, iterations=iterations, bn_teacher_usage=usage_map, seconds=seconds,
                       history=_sample_history(ce_curve, bn_curve, cfg.r_bn))


def _normalized(name: str, value: Optional[torch.Tensor], scales: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
    """A teacher's BN loss over its detached value at first use, so each teacher starts at 1 whatever its depth."""
    if value is None:
        return None
    if name not in scales:
        scales[name] = value.detach().clamp_min(_SCALE_FLOOR)
    return value / scales[name]


def _sample_history(ce: torch.Tensor, bn: torch.Tensor, r_bn: float) -> dict[str, list]:
    n = len(ce)
    every = max(1, n // HISTORY_POINTS)
    steps = list(range(0, n, every))
    if steps[-1] != n - 1:
        steps.append(n - 1)
    idx = torch.tensor(steps)
    ce_s, bn_s = ce[idx], bn[idx]
    return {"iteration": steps, "loss": (ce_s + r_bn * bn_s).tolist(), "loss_ce": ce_s.tolist(),
            "loss_bn": bn_s.tolist()}
