"""SSIM against values known in closed form and against a direct per-window evaluation of the formula."""
from __future__ import annotations

import math

import pytest
import torch

from prism_ray.algo.similarity import gaussian_window, ssim

C1, C2 = 0.01 ** 2, 0.03 ** 2


def direct_ssim(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """The paper's definition evaluated window by window with explicit weighted sums (one channel)."""
    g = gaussian_window(size, sigma)
    w = torch.outer(g, g)
    x, y = x.double(), y.double()
    h, wd = x.shape
    values = []
    for i in range(h - size + 1):
        for j in range(wd - size + 1):
            a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * a).sum(), (w * b).sum()
            vx, vy = (w * (a - mx) ** 2).sum(), (w * (b - my) ** 2).sum()
            cxy = (w * (a - mx) * (b - my)).sum()
            values.append(((2 * mx * my + C1) * (2 * cxy + C2) / ((mx ** 2 + my ** 2 + C1) * (vx + vy + C2))).item())
    return sum(values) / len(values)


def images(seed: int, n: int = 3, c: int = 1, size: int = 16) -> torch.Tensor:
    return torch.rand((n, c, size, size), generator=torch.Generator().manual_seed(seed))


def test_identical_images_score_one():
    x = images(0, n=4, c=3)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-6)


def test_constant_images_score_their_luminance_term():
    # no structure (all variances 0): SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly
    a, b = 0.2, 0.6
    x, y = torch.full((1, 1, 20, 20), a), torch.full((1, 1, 20, 20), b)
    assert ssim(x, y).item() == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), rel=1e-6)
    assert ssim(x, y).item() == pytest.approx(0.600100, abs=1e-6)


def test_negative_image_inverts_the_structure():
    # a checkerboard of 0.1/0.9 and its negative: every window has mean ~0.5 and the covariance is minus
    # the variance, so SSIM = (lum ~1) * (-2 var + C2) / (2 var + C2) with var ~0.16: about -0.994
    board = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    x = (0.1 + 0.8 * board.float())[None, None]
    value = ssim(x, 1 - x).item()
    assert value == pytest.approx(direct_ssim(x[0, 0], 1 - x[0, 0]), abs=1e-6)
    assert -1.0 <= value < -0.99
    # a random image and its negative: also the direct formula, and strongly negative
    r = images(1, n=1)
    assert ssim(r, 1 - r).item() == pytest.approx(direct_ssim(r[0, 0], 1 - r[0, 0]), abs=1e-6)
    assert ssim(r, 1 - r).item() < -0.9


def test_matches_the_window_by_window_definition():
    x, y = images(2, n=2), images(3, n=2)
    y = 0.6 * x + 0.4 * y  # related images: SSIM well inside (0, 1)
    got = ssim(x, y)
    for i in range(2):
        assert got[i].item() == pytest.approx(direct_ssim(x[i, 0], y[i, 0]), abs=1e-6)
    assert 0.2 < got.min() and got.max() < 0.99


def test_channels_average_and_batches_are_independent():
    x, y = images(4, n=2, c=3), images(5, n=2, c=3)
    per_channel = [ssim(x[:, k:k + 1], y[:, k:k + 1]) for k in range(3)]
    assert torch.allclose(ssim(x, y), sum(per_channel) / 3, atol=1e-6)
    assert torch.allclose(ssim(x[1:], y[1:]), ssim(x, y)[1:])
    assert ssim(x[0], y[0]).dim() == 0  # one (C, H, W) pair gives a scalar


def test_symmetric_and_decreasing_with_noise():
    x = images(6, n=1, size=28)
    assert ssim(x, images(7, n=1, size=28)).item() == pytest.approx(ssim(images(7, n=1, size=28), x).item())
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    scores = [ssim(x, (x + s * noise).clamp(0, 1)).item() for s in (0.0, 0.05, 0.1, 0.3)]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(1.0)


def test_data_range_scales_with_the_pixels():
    x, y = images(9), images(10)
    assert torch.allclose(ssim(255 * x, 255 * y, data_range=255.0), ssim(x, y), atol=1e-5)


def test_small_images_use_a_smaller_window():
    x, y = images(11, size=8), images(12, size=8)
    got = ssim(x, y)  # window 7 on 8 px images: 2 x 2 windows
    assert got[0].item() == pytest.approx(direct_ssim(x[0, 0], y[0, 0], size=7), abs=1e-6)
    assert not math.isnan(got.sum().item())


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        ssim(images(0, size=16), images(0, size=12))
