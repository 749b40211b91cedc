"""FKD-style soft labels: everything random about one epoch of student training, and the teachers' logits on it.

An epoch plan fixes, per position p of the epoch (the p-th image the student sees):

    order[p]      the image placed there (a permutation of the set)
    crops[p]      its RandomResizedCrop box (top, left, height, width) in source pixels, resized to out_size
    flips[p]      its horizontal flip
    partner[p]    the position whose augmented image CutMix pastes into p (p itself: no mix)
    mix_box[p]    the pasted box (top, left, bottom, right) in output pixels, one box per mix group
    mix_lam[p]    the fraction of p's own image that is kept, 1 - box area / out_size^2

Positions come in mix groups of `mix_group` consecutive positions: CutMix permutes inside a group (the
reference's one permutation, one Beta(1, 1) ratio and one box per relabel batch), and the teachers run on
one group at a time. A teacher's logits for a position therefore depend on its group only, never on how
many groups a call covers, so stored labels (relabel stage) and live labels (teachers run during student
training) are bitwise identical whatever batch size the student uses, as long as both use `soft_labels`.

The plan is a pure function of (seed, epoch) and the sizes: all draws come from one CPU torch.Generator
seeded with derive_seed(seed, "relabel", epoch).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prism_ray.algo.augment import crop_box
from prism_ray.algo.image_source import as_source
from prism_ray.algo.seeding import generator


@dataclass
class EpochPlan:
    """Everything random about one epoch of student training (see the module docstring)."""

    epoch: int
    order: torch.Tensor  # (N,) int64
    crops: torch.Tensor  # (N, 4) int32: top, left, height, width in source pixels
    flips: torch.Tensor  # (N,) bool
    partner: torch.Tensor  # (N,) int64: a position in the same mix group
    mix_box: torch.Tensor  # (N, 4) int32: top, left, bottom, right in output pixels; zeros = no mix
    mix_lam: torch.Tensor  # (N,) float32: kept fraction of the position's own image
    mix_group: int
    out_size: int | None = None  # side of the augmented images the CutMix boxes were drawn for

    def __len__(self) -> int:
        return int(self.order.shape[0])

    @property
    def num_groups(self) -> int:
        return math.ceil(len(self) / self.mix_group)

    def to(self, device: torch.device | str) -> "EpochPlan":
        """The plan with its tensors on `device` (one copy per epoch, so batches index it there)."""
        moved = {f: getattr(self, f).to(device) for f in ("order", "crops", "flips", "partner", "mix_box", "mix_lam")}
        return EpochPlan(epoch=self.epoch, mix_group=self.mix_group, out_size=self.out_size, **moved)

    def groups(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """(start, stop) of each mix group inside positions [start, stop), which must be whole groups."""
        start, stop = _check_range(self, start, stop)
        for s in range(start, stop, self.mix_group):
            yield s, min(s + self.mix_group, stop)


def _check_range(plan: EpochPlan, start: int, stop: int | None) -> tuple[int, int]:
    n = len(plan)
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"positions [{start}, {stop}) are outside the epoch's [0, {n})")
    if start % plan.mix_group or (stop % plan.mix_group and stop != n):
        raise ValueError(f"positions [{start}, {stop}) must be whole mix groups of {plan.mix_group} "
                         f"(start and stop multiples of {plan.mix_group}, or stop = {n})")
    return start, stop


def _uniform(g: torch.Generator) -> float:
    return torch.rand((), generator=g, dtype=torch.float64).item()


def cutmix_box(g: torch.Generator, size: int) -> tuple[int, int, int, int]:
    """CutMix's box for a size x size output: ratio lam ~ Beta(1, 1) = U(0, 1), sides int(size * sqrt(1 - lam)),
    centre uniform over the pixels, clipped to the image (so the box may be smaller than drawn).

    Returns (top, left, bottom, right), bottom/right exclusive.
    """
    cut = int(size * math.sqrt(1.0 - _uniform(g)))
    cy = int(torch.randint(size, (), generator=g))
    cx = int(torch.randint(size, (), generator=g))
    half = cut // 2
    return max(cy - half, 0), max(cx - half, 0), min(cy + half, size), min(cx + half, size)


def plan_epoch(num_images: int, epoch: int, seed: int, *, mix_group: int, source_size: tuple[int, int],
               crop_scale: Sequence[float], cutmix: bool, out_size: int | None = None) -> EpochPlan:
    """The plan of one epoch: shuffle, per-position crop box and flip, per-group CutMix.

    `out_size` is the side of the student's input (the CutMix box lives there); it defaults to the source
    height. Draw order: permutation, then crop boxes, flips, then per group (permutation, ratio, centre).
    """
    if num_images < 1 or mix_group < 1:
        raise ValueError(f"need at least one image and mix_group >= 1, got {num_images} and {mix_group}")
    height, width = int(source_size[0]), int(source_size[1])
    out = int(out_size or height)
    g = generator(seed, "relabel", epoch)
    order = torch.randperm(num_images, generator=g)
    crops = torch.tensor([crop_box(g, height, width, crop_scale) for _ in range(num_images)],
                         dtype=torch.int32).reshape(num_images, 4)
    flips = torch.rand(num_images, generator=g) < 0.5
    partner = torch.arange(num_images)
    mix_box = torch.zeros(num_images, 4, dtype=torch.int32)
    mix_lam = torch.ones(num_images, dtype=torch.float32)
    if cutmix:
        for s in range(0, num_images, mix_group):
            e = min(s + mix_group, num_images)
            perm = torch.randperm(e - s, generator=g) + s
            top, left, bottom, right = cutmix_box(g, out)
            mixed = perm != torch.arange(s, e)
            area = (bottom - top) * (right - left)
            partner[s:e] = perm
            mix_box[s:e][mixed] = torch.tensor([top, left, bottom, right], dtype=torch.int32)
            mix_lam[s:e][mixed] = 1.0 - area / (out * out)
    return EpochPlan(epoch=epoch, order=order, crops=crops, flips=flips, partner=partner, mix_box=mix_box,
                     mix_lam=mix_lam, mix_group=mix_group, out_size=out)


def _crop_resize(image: torch.Tensor, box: Sequence[int], flip: bool, out_size: int) -> torch.Tensor:
    """One image's crop, resized alone (antialiased bilinear, as torchvision's resized_crop on PIL images)."""
    top, left, h, w = (int(v) for v in box)
    x = image[None, :, top:top + h, left:left + w].float()
    if (h, w) != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
    return x.flip(-1) if flip else x


def _grid_axis(start: torch.Tensor, length: torch.Tensor, size: int, out_size: int) -> torch.Tensor:
    """grid_sample coordinates (align_corners=False) along one axis of each crop, (B, out): the source
    position F.interpolate(align_corners=False) samples for output d, (d + 0.5) * length / out - 0.5,
    clamped into the crop's first and last pixel as F.interpolate clamps into the cropped tensor."""
    d = torch.arange(out_size, device=length.device, dtype=torch.float32) + 0.5
    src = (d * (length.float()[:, None] / out_size) - 0.5).clamp_min_(0.0)
    src = torch.minimum(src, (length - 1).float()[:, None]) + start.float()[:, None]
    return (2.0 * src + 1.0) / size - 1.0


def crop_resize_batch(pixels: torch.Tensor, crops: torch.Tensor, flips: torch.Tensor, out_size: int) -> torch.Tensor:
    """Every image's crop box resized to out_size x out_size (bilinear) and flipped, in one grid_sample.

    pixels (B, C, H, W) uint8 or float, crops (B, 4) top/left/height/width, flips (B,) bool, on one device;
    returns float32 (B, C, out, out). Each image gets its own sampling grid: the crop box's sample points,
    clamped inside the box (so no pixel outside the crop leaks in at its edges), reversed along x when
    flipped. Each output depends only on its own image and box, so a position's result does not depend on
    the batch around it. For boxes no larger than the output (upsampling, where antialiasing does nothing)
    it equals the per-image F.interpolate up to float rounding of the coordinates: at most 0.004 of a
    pixel level (0..255) measured on 224 px crops.
    """
    _, _, h, w = pixels.shape
    top, left, height, width = crops.to(pixels.device).unbind(1)
    gx = _grid_axis(left, width, w, out_size)
    gy = _grid_axis(top, height, h, out_size)
    gx = torch.where(flips.to(pixels.device)[:, None], gx.flip(1), gx)
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, out, out, 2): x, y
    return F.grid_sample(pixels.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


@functools.lru_cache(maxsize=16)
def _channel_stats(mean: tuple, std: tuple, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as (1, C, 1, 1) float32 tensors on `device`, made once: a host -> device copy per batch
    would make every batch wait for the GPU."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


def augment_batch(pixels: torch.Tensor, plan: EpochPlan, start: int, stop: int, out_size: int,
                  normalization=None) -> torch.Tensor:
    """The augmented batch of positions [start, stop) (whole mix groups) from their source images.

    pixels: (stop - start, C, H, W), the images plan.order[start:stop] in order: uint8 with `normalization`
    (mean/std, applied after the resize), or float network input without. Crop, resize, flip, normalization
    and CutMix run batched on the pixels' device; the plan may live there too (`EpochPlan.to`), so a batch
    needs no host round trip. When out_size is at least the source's side, crops (never larger than the
    source) are upsampled and `crop_resize_batch` does them all at once; a smaller output needs
    antialiasing, and each image is resized on its own as before.
    """
    start, stop = _check_range(plan, start, stop)
    if start == stop:
        raise ValueError("no positions to augment")
    if plan.out_size is not None and plan.out_size != out_size:
        raise ValueError(f"the plan's CutMix boxes are for {plan.out_size} px outputs, asked for {out_size} px")
    if pixels.shape[0] != stop - start:
        raise ValueError(f"{pixels.shape[0]} images for {stop - start} positions")
    if pixels.dtype == torch.uint8 and normalization is None:
        raise ValueError("uint8 images need their normalization (mean/std) to become network input")
    dev = pixels.device
    if out_size >= max(pixels.shape[-2:]):
        x = crop_resize_batch(pixels, plan.crops[start:stop], plan.flips[start:stop], out_size)
    else:
        crops, flips = plan.crops[start:stop].tolist(), plan.flips[start:stop].tolist()
        x = torch.cat([_crop_resize(pixels[i], crops[i], flips[i], out_size) for i in range(stop - start)])
    if normalization is not None:  # (x / 255 - mean) / std, in place on the fresh resized batch
        mean, std = _channel_stats(tuple(normalization.mean), tuple(normalization.std), str(dev))
        x = x.div_(255.0).sub_(mean).div_(std)
    # CutMix: paste each mixed position's box from its partner's un-mixed image (the reference's one-shot
    # indexing); unmixed positions have an all-zero box, which selects nothing
    partner = plan.partner[start:stop].to(dev) - start
    box = plan.mix_box[start:stop].to(dev)
    r = torch.arange(out_size, device=dev)
    inside_rows = (r[None, :] >= box[:, 0:1]) & (r[None, :] < box[:, 2:3])  # (B, out)
    inside_cols = (r[None, :] >= box[:, 1:2]) & (r[None, :] < box[:, 3:4])
    inside = inside_rows[:, None, :, None] & inside_cols[:, None, None, :]
    return torch.where(inside, x.index_select(0, partner), x)


def augment_positions(images, plan: EpochPlan, start: int, stop: int, out_size: int) -> torch.Tensor:
    """The augmented batch of positions [start, stop) (whole mix groups), (stop - start, C, out, out).

    images: an `ImageSource`, a normalized float (N, C, H, W) tensor, or a sequence whose [i] is image i as
    a (C, H, W) tensor. Runs on the images' device (see `augment_batch`).
    """
    source = as_source(images)
    start, stop = _check_range(plan, start, stop)
    device = getattr(source, "device", torch.device("cpu"))
    pixels = next(source.batches(plan.order, [(start, stop)], device))
    return augment_batch(pixels, plan, start, stop, out_size, source.normalization)


ENSEMBLES = ("mean_norm", "primary_weighted")


def ensemble_logits(teachers: Sequence[nn.Module], x: torch.Tensor, *, method: str = "mean_norm") -> torch.Tensor:
    """float32 (B, K) logits of the teachers on batch x (the batch is one mix group in `soft_labels`).

    mean_norm (PRISM's ResNet-18 relabel, as G-VBSM's): one teacher gives its logits; with several, each
    teacher's logit matrix L_m (B x K) is rescaled to the teachers' mean Frobenius norm over the batch,
    L_m * mean_j ||L_j|| / ||L_m||, and the rescaled matrices are averaged.
    primary_weighted (PRISM's ResNet-50/101 relabel): 0.5 L_1 + 0.5 / (M - 1) * sum_{m>1} L_m (teachers[0] is
    the primary; L_1 alone for one teacher), then each row rescaled to the batch's mean row norm.
    """
    if not teachers:
        raise ValueError("no teachers to label with")
    if method not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {', '.join(ENSEMBLES)}, got {method!r}")
    with torch.no_grad():
        outs = [t(x).float() for t in teachers]
        if method == "primary_weighted":
            mixed = outs[0] if len(outs) == 1 else 0.5 * outs[0] + (0.5 / (len(outs) - 1)) * sum(outs[1:])
            rows = torch.linalg.vector_norm(mixed, dim=1, keepdim=True)
            return mixed / rows.clamp_min(1e-12) * rows.mean(0, keepdim=True)
        if len(outs) == 1:
            return outs[0]
        stacked = torch.stack(outs)  # (M, B, K)
        norms = torch.linalg.vector_norm(stacked, dim=(1, 2), keepdim=True)
        return (stacked / norms.clamp_min(1e-12) * norms.mean(0, keepdim=True)).mean(0)


def soft_labels(images, plan: EpochPlan, teachers: Sequence[nn.Module], *, out_size: int, topk: int = 0,
                device: torch.device | str = "cpu", start: int = 0, stop: int | None = None,
                ensemble: str = "mean_norm") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teachers' logits on the plan's augmented positions [start, stop) (default: the whole epoch).

    images: an `ImageSource` (uint8 resident or encoded set) or a normalized float tensor. Teachers (frozen,
    eval mode, on `device`) run one mix group at a time on the device, combined by `ensemble_logits` with
    `ensemble` as its method. Returns fp16 logits (n, K) and None when topk is 0; else the top-k of those
    fp16 logits per row, values fp16 (n, topk) and int32 class indices (n, topk), largest first. Rows are in
    position order; all outputs are on the CPU, copied there once at the end.
    """
    start, stop = _check_range(plan, start, stop)
    device = torch.device(device)
    source = as_source(images)
    on_device = plan.to(device)
    groups = list(plan.groups(start, stop))
    # one output allocated up front, filled group by group: a list of small per-group results kept alive
    # between the groups' large transient batches fragments the host heap (glibc): +1.9 GB at 50,000 images
    values = None
    for (s, e), pixels in zip(groups, source.batches(plan.order, groups, device)):
        x = augment_batch(pixels, on_device, s, e, out_size, source.normalization)
        logits = ensemble_logits(teachers, x, method=ensemble)
        del x
        if values is None:
            values = torch.empty((stop - start, logits.shape[1]), dtype=torch.float16, device=logits.device)
        values[s - start:e - start] = logits
    values = values.cpu()
    if not topk:
        return values, None
    if topk > values.shape[1]:
        raise ValueError(f"topk {topk} exceeds the {values.shape[1]} classes")
    # top-k of the stored fp16 values, so top-k storage is an exact subset of full storage
    top = values.float().topk(topk, dim=1)
    return top.values.to(torch.float16), top.indices.to(torch.int32)


def dense_labels(values: torch.Tensor, indices: torch.Tensor | None, num_classes: int, *,
                 fill: float | None = None) -> torch.Tensor:
    """float32 (N, K) logits for the loss from full fp16 logits, or from top-k values and class indices.

    Classes outside a row's top-k get `fill`, by default the row's smallest stored value (its k-th largest
    logit): finite, so MSE on logits stays bounded, and it keeps the argmax and the order of the top-k.
    """
    if indices is None:
        if values.shape[1] != num_classes:
            raise ValueError(f"full logits have {values.shape[1]} classes, expected {num_classes}")
        return values.float()
    if values.shape != indices.shape:
        raise ValueError(f"top-k values {tuple(values.shape)} and indices {tuple(indices.shape)} differ in shape")
    v = values.float()
    base = v.min(dim=1, keepdim=True).values if fill is None else torch.full_like(v[:, :1], float(fill))
    return base.expand(-1, num_classes).clone().scatter_(1, indices.long(), v)
