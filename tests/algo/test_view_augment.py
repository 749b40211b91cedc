"""The shared per-step view: random resized crop, flip and roll, drawn from a generator."""
from __future__ import annotations

import pytest
import torch

from prism_ray.algo.augment import View, apply_view, crop_box, draw_view


def test_crop_box_area_and_bounds():
    g = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(2000):
        top, left, h, w = crop_box(g, 224, 224, (0.08, 1.0))
        assert 0 <= top <= 224 - h and 0 <= left <= 224 - w and h > 0 and w > 0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02 or (h, w) == (224, 224)
        fractions.append(h * w / 224 ** 2)
    assert min(fractions) >= 0.079 and max(fractions) <= 1.0
    # uniform area fraction in [0.08, 1] (large ones are rejected more often, hence a lower mean)
    assert 0.35 < sum(fractions) / len(fractions) < 0.54
    for _ in range(50):
        assert crop_box(g, 28, 28, (1.0, 1.0)) == (0, 0, 28, 28)


def test_view_draws_cover_the_jitter_range_and_flip_half_the_time():
    g = torch.Generator().manual_seed(1)
    views = [draw_view(g, 32, 32, (0.5, 1.0), jitter=3) for _ in range(1000)]
    assert {v.roll_y for v in views} == {0, 1, 2, 3}
    assert {v.roll_x for v in views} == {0, 1, 2, 3}
    assert sum(v.flip for v in views) / len(views) == pytest.approx(0.5, abs=0.06)
    assert all(v.roll_x == v.roll_y == 0 for v in (draw_view(g, 32, 32, (0.5, 1.0), 0) for _ in range(50)))
    again = torch.Generator().manual_seed(1)
    assert [draw_view(again, 32, 32, (0.5, 1.0), jitter=3) for _ in range(1000)] == views


def test_apply_view_flip_roll_and_crop():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    assert torch.equal(apply_view(x, View(0, 0, 6, 6, False, 0, 0)), x)
    assert torch.equal(apply_view(x, View(0, 0, 6, 6, True, 0, 0)), x.flip(-1))
    assert torch.equal(apply_view(x, View(0, 0, 6, 6, False, 2, 1)), torch.roll(x, (2, 1), (2, 3)))
    # flip first, then roll (the reference's order)
    assert torch.equal(apply_view(x, View(0, 0, 6, 6, True, 1, 0)), torch.roll(x.flip(-1), (1, 0), (2, 3)))
    # a 3x3 crop upsampled 2x: each output pixel interpolates inside the crop only
    out = apply_view(x, View(1, 2, 3, 3, False, 0, 0))
    crop = x[:, :, 1:4, 2:5]
    assert out.shape == x.shape
    assert out.min() >= crop.min() and out.max() <= crop.max()
    assert out[0, 0, 0, 0] == crop[0, 0, 0, 0]  # align_corners=False clamps the corner samples


def test_apply_view_passes_gradients():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    apply_view(x, View(1, 1, 5, 6, True, 2, 3)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
