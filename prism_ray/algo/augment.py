"""The per-step view of the synthetic batch: one random resized crop and one flip shared by the whole batch,
then a random roll (the reference's jitter).

Parameters are drawn from a CPU torch.Generator as Python numbers, so the step itself is pure tensor work on
the batch's device and a shard's views are the same on every run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default, which the reference uses


@dataclass(frozen=True)
class View:
    """Crop box (top, left, height, width), horizontal flip, and roll offsets (down, right) in pixels."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    roll_y: int
    roll_x: int


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both ends included."""
    return int(torch.randint(low, high + 1, (), generator=g))


def crop_box(g: torch.Generator, height: int, width: int, scale: Sequence[float],
             ratio: Sequence[float] = RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: area fraction uniform in `scale`, log aspect ratio uniform in `ratio`.

    Ten tries as torchvision does; if none fits, the largest centred box with the ratio clamped into range.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, 0, height - h), _randint(g, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_view(g: torch.Generator, height: int, width: int, scale: Sequence[float], jitter: int) -> View:
    """One step's crop box, flip (probability 0.5) and roll offsets (each uniform in 0..jitter)."""
    top, left, h, w = crop_box(g, height, width, scale)
    flip = torch.rand((), generator=g, dtype=torch.float64).item() < 0.5
    roll_y = _randint(g, 0, jitter) if jitter > 0 else 0
    roll_x = _randint(g, 0, jitter) if jitter > 0 else 0
    return View(top, left, h, w, flip, roll_y, roll_x)


def apply_view(x: torch.Tensor, view: View) -> torch.Tensor:
    """Crop `x` (N, C, H, W) to the box, resize back to H x W (bilinear), flip, roll; differentiable in `x`."""
    height, width = x.shape[-2:]
    out = x[..., view.top:view.top + view.height, view.left:view.left + view.width]
    if (view.height, view.width) != (height, width):
        out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
    if view.flip:
        out = out.flip(-1)
    if view.roll_y or view.roll_x:
        out = torch.roll(out, shifts=(view.roll_y, view.roll_x), dims=(-2, -1))
    return out
