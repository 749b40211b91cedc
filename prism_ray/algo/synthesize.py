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

Speed (docs/recover.md, "Speed"): the step loop never waits for the device (no .item(), no host copies until
the shard ends); with recover.precision bf16 the teachers run from a bf16 copy made once (`TeacherSet`,
channels_last on CUDA), and
`compile=` hands each teacher's forward pass with its BN statistics to torch.compile. Encoding the images
to JPEG/PNG happens when `ShardResult.encoded` is first read, which the recover worker does while the
next shard computes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

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
    """One cross-class batch: IPC index `ipc_index` of every class in `class_ids`, with its own seed; the teacher
    draws come from `teacher_seed` when given (recover.draw_per: ipc gives every shard of an IPC index one)."""

    shard_id: str
    ipc_index: int
    class_ids: tuple[int, ...]
    seed: int
    teacher_seed: Optional[int] = None  # seeds the teacher draws instead of `seed` (a draw shared by shards)

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


class ShardResult:
    """The images of one shard (normalized CPU tensor and encoded files, in class_ids order) and their records.

    `encoded` is computed on first read (JPEG/PNG encoding costs ~1 ms per 224 px image): the recover
    worker reads it in its commit, which runs while the next shard computes.
    """

    def __init__(self, spec: ShardSpec, images: torch.Tensor, extension: str, records: list[ImageRecord],
                 iterations: int, bn_teacher_usage: dict[str, int], seconds: float,
                 history: Optional[dict[str, list]] = None, *, encoder=None, encoded: Optional[list[bytes]] = None):
        if (encoder is None) == (encoded is None):
            raise ValueError("ShardResult needs exactly one of encoded (the files) or encoder (makes them)")
        self.spec, self.images, self.extension, self.records = spec, images, extension, records
        self.iterations, self.bn_teacher_usage, self.seconds = iterations, bn_teacher_usage, seconds
        self.history = history if history is not None else {}  # iteration, loss, loss_ce, loss_bn
        self._encoder, self._encoded = encoder, encoded
        self._lock = threading.Lock()

    @property
    def encoded(self) -> list[bytes]:
        """One encoded file per image (made once, on first read)."""
        with self._lock:
            if self._encoded is None:
                self._encoded = self._encoder(self.images)
                self._encoder = None
            return self._encoded

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


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def inference_form(model: nn.Module, *, amp: bool = False, channels_last: bool = False) -> nn.Module:
    """`model` as the engine runs it: frozen (eval, no parameter gradients), channels_last when asked, and with
    amp a copy whose conv and linear weights are stored in bf16.

    Autocast casts fp32 weights to bf16 at every forward and cannot cache the cast for frozen weights: a
    bf16 copy does that rounding once, with the same result. BatchNorm layers keep fp32 parameters and
    running statistics, as under autocast. Without amp the model itself is returned, converted in place.
    """
    model = freeze(model)
    if amp:
        model = copy.deepcopy(model)
        for m in model.modules():
            m._forward_hooks.clear()  # a copy of another TeacherSet's hooks would feed that set, not ours
            if isinstance(m, _WEIGHTED):
                m.to(torch.bfloat16)
    if channels_last:  # NHWC lets cuDNN use its fastest (tensor-core) convolution kernels
        model = model.to(memory_format=torch.channels_last)
    return model


class _TeacherPass(nn.Module):
    """One teacher's forward pass and its BN loss, as one module: what torch.compile gets."""

    def __init__(self, model: nn.Module, hooks: BNStatisticHooks):
        super().__init__()
        self.model = model
        self.hooks = hooks

    def forward(self, x: torch.Tensor):
        return self.model(x), self.hooks.pop_loss()


class TeacherSet:
    """Teachers ready to run shard after shard: inference form on the device, BN hooks, optional compile.

    synthesize_shard builds one per shard from a plain pool; a worker that builds one itself and passes
    it instead keeps the bf16 copies and the compiled code across shards. `compile` is None (eager) or
    the keyword arguments of torch.compile (e.g. {"mode": "reduce-overhead"} for CUDA graphs); each
    teacher is compiled on its own, so a step compiles nothing new whichever teachers it draws.
    `close()` removes the hooks.
    """

    def __init__(self, pool: Mapping[str, nn.Module], device: torch.device | str = "cpu", *, amp: bool = False,
                 channels_last: bool = True, first_bn_multiplier: float = 10.0,
                 compile: Optional[Mapping[str, Any]] = None, names: Optional[Sequence[str]] = None):
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        # bf16 wherever asked (the CPU too, for measuring what it changes); NHWC pays on CUDA (tensor cores) and
        # on the CPU (oneDNN: 1.2x per step at the demo's shapes, docs/benchmarks.md)
        self.amp, self.channels_last = amp, channels_last
        if on_cuda:  # every step feeds the teachers the same shape: cuDNN's autotuned kernels pay back at once
            torch.backends.cudnn.benchmark = True
        self.first_bn_multiplier = first_bn_multiplier
        self.compile = dict(compile) if compile is not None else None
        missing = [n for n in (names or pool) if n not in pool]
        if missing:
            raise KeyError(f"teacher(s) {', '.join(missing)} not in the loaded pool ({', '.join(pool) or 'empty'})")
        self.models = {n: inference_form(pool[n], amp=self.amp, channels_last=self.channels_last)
                       for n in dict.fromkeys(names or pool)}
        self.hooks = {n: BNStatisticHooks(m, first_bn_multiplier) for n, m in self.models.items()}
        self._passes = {n: _TeacherPass(m, self.hooks[n]) for n, m in self.models.items()}
        if self.compile is not None:
            self._passes = {n: torch.compile(p, **self.compile) for n, p in self._passes.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.models

    def has_bn(self, name: str) -> bool:
        return self.hooks[name].has_bn

    def forward(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Teacher `name` on x: its logits and its BN loss (None without BN layers)."""
        return self._passes[name](x)

    def step_begin(self) -> None:
        """Mark a new step: compiled CUDA graphs may then reuse the memory of the previous step's outputs."""
        if self.compile is not None and self.compile.get("mode") in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()

    def close(self) -> None:
        for h in self.hooks.values():
            h.remove()


def synthesize_shard(pool: Mapping[str, nn.Module] | TeacherSet, spec: ShardSpec, cfg: "RecoverConfig",
                     normalization: "Normalization", init_images: Optional[torch.Tensor] = None,
                     device: torch.device | str = "cpu", *, shape: Optional[Sequence[int]] = None,
                     compile: Optional[Mapping[str, Any]] = None) -> ShardResult:
    """Synthesize the images of `spec` with the teachers of `pool` (name -> model on `device`, or a TeacherSet).

    init_images: (N, C, H, W) normalized real images, N = len(spec.class_ids), for init 'real'; for init
    'noise', `shape` (C, H, W) or init_images gives the size. A plain pool's models are frozen and set to
    eval mode (and to channels_last on CUDA when cfg.channels_last) in place; `compile` as in TeacherSet.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    draws = spec.seed if spec.teacher_seed is None else spec.teacher_seed
    selection = TeacherSelection(cfg.primary, cfg.selection, pool=cfg.bn_pool, slots=cfg.slots,
                                 prob=cfg.slot_prob, fixed=cfg.fixed, generator=generator(draws, "teachers"))
    names = selection.candidates()
    missing = [n for n in names if n not in pool]
    if missing:
        loaded = pool.models if isinstance(pool, TeacherSet) else pool
        raise KeyError(f"shard {spec.shard_id}: teacher(s) {', '.join(missing)} not in the loaded pool "
                       f"({', '.join(loaded) or 'empty'})")
    iterations = iterations_for(spec.ipc_index, cfg.iterations, cfg.schedule, cfg.cyclic_step, cfg.cyclic_period)
    own = not isinstance(pool, TeacherSet)
    if not own:
        _check_teacher_set(pool, cfg, device, spec)
    x = initial_images(spec, cfg, init_images, shape).to(device)  # before any hook exists: it may raise
    teachers = TeacherSet(pool, device, amp=cfg.precision == "bf16", channels_last=cfg.channels_last,
                          first_bn_multiplier=cfg.first_bn_multiplier, compile=compile, names=names) if own else pool
    try:  # from here on the teachers carry hooks: a failure must not leave them behind
        if teachers.channels_last:
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
        for step in range(iterations):
            teachers.step_begin()
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, iterations, cfg.lr)  # a Python float: setting it syncs nothing
            step_teachers = selection.next_step()
            usage.update(step_teachers)
            view = draw_view(views, height, width, cfg.crop_scale, cfg.jitter)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=teachers.amp):
                x_view = apply_view(x, view)
                logits, primary_bn = teachers.forward(cfg.primary, x_view)
                per_teacher: dict[str, Optional[torch.Tensor]] = {cfg.primary: primary_bn}
                for name in step_teachers[1:]:
                    # run for its BN loss only (its logits are not used); a BN-free teacher is not run at all
                    per_teacher[name] = teachers.forward(name, x_view)[1] if teachers.has_bn(name) else None
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
        if own:
            teachers.close()

    # the only device -> host copies of the shard
    ce_curve = torch.stack(ce_history).cpu()
    bn_curve = torch.stack(bn_history).cpu()
    final_ce = ce_each.detach().float().cpu().tolist()
    images = x.detach().to("cpu", torch.float32).contiguous()
    seconds = time.perf_counter() - t0

    used = [n for n in names if usage[n]]
    usage_map = {n: int(usage[n]) for n in used}
    usage_json = json.dumps(usage_map, sort_keys=True)
    final_bn = float(bn_curve[-1])
    records = [ImageRecord(class_id=c, ipc_index=spec.ipc_index, seed=spec.seed, primary_teacher=cfg.primary,
                           bn_teachers=list(used), bn_teacher_usage=usage_json, iterations=iterations,
                           loss_ce=float(final_ce[i]), loss_bn=final_bn, seconds=seconds / len(spec.class_ids))
               for i, c in enumerate(spec.class_ids)]
    image_format, quality = cfg.image_format, cfg.jpeg_quality
    file_extension(image_format)  # an unknown format fails here, in the shard, not later in its commit
    return ShardResult(spec=spec, images=images, extension=file_extension(image_format), records=records,
                       iterations=iterations, bn_teacher_usage=usage_map, seconds=seconds,
                       history=_sample_history(ce_curve, bn_curve, cfg.r_bn),
                       encoder=lambda imgs: encode_images(imgs, normalization, image_format, quality))


def _check_teacher_set(teachers: TeacherSet, cfg: "RecoverConfig", device: torch.device, spec: ShardSpec) -> None:
    """A TeacherSet built by the caller must have been built for this config and device."""
    want = {"device": device.type, "amp": cfg.precision == "bf16", "channels_last": cfg.channels_last,
            "first_bn_multiplier": cfg.first_bn_multiplier}
    have = {"device": teachers.device.type, "amp": teachers.amp, "channels_last": teachers.channels_last,
            "first_bn_multiplier": teachers.first_bn_multiplier}
    wrong = [f"{k}={have[k]!r} (the config needs {want[k]!r})" for k in want if want[k] != have[k]]
    if wrong:
        raise ValueError(f"shard {spec.shard_id}: the TeacherSet was built with {', '.join(wrong)}")


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
