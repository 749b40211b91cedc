"""How much of an image another image keeps: SSIM (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 2004).

PRISM starts each synthetic image from a real one; the SSIM between the two after recover measures how
much of the real image survives the optimization (1: untouched, about 0: nothing left, negative: inverted
structure). Per window, with Gaussian weights w (11 x 11, sigma 1.5), local means mu, variances sigma^2
(weighted, biased) and covariance sigma_xy:

    SSIM = (2 mu_x mu_y + C1) (2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2))

C1 = (0.01 L)^2, C2 = (0.03 L)^2, L the pixel range. An image's SSIM is the mean over every window that
fits inside it (no padding, as the paper) and over channels. Pure torch, batched.
"""
from __future__ import annotations

import torch

K1, K2 = 0.01, 0.03
WINDOW, SIGMA = 11, 1.5


def gaussian_window(size: int, sigma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalized 1-D Gaussian of `size` taps; the 2-D window is its outer product."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _window_size(height: int, width: int, window: int) -> int:
    """The window, shrunk to the largest odd size that fits a small image."""
    size = min(window, height, width)
    return size if size % 2 else size - 1


def _band(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n, n - size + 1): column j holds the window `g` at rows j .. j + size - 1, so `t @ band` is the valid
    1-D convolution of t's last axis. Two such products blur an image in float64 about 4x faster on a CPU than
    depthwise float64 convolutions (which have no fast kernel: at 224 px they took 90 % of a recover shard)."""
    size = len(g)
    band = torch.zeros(n, n - size + 1, dtype=g.dtype, device=g.device)
    cols = torch.arange(n - size + 1, device=g.device)
    for k in range(size):
        band[cols + k, cols] = g[k]
    return band


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float = 1.0, window: int = WINDOW,
         sigma: float = SIGMA) -> torch.Tensor:
    """SSIM of each image pair: x, y (N, C, H, W) or (C, H, W) pixels in [0, data_range]; returns (N,) float32
    (a scalar for one pair).

    Computed in float64 (the local variances are differences of close numbers).
    """
    if x.shape != y.shape:
        raise ValueError(f"ssim needs images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    single = x.dim() == 3
    if single:
        x, y = x[None], y[None]
    if x.dim() != 4:
        raise ValueError(f"ssim needs (N, C, H, W) or (C, H, W) images, got {tuple(x.shape)}")
    n, c, h, w = x.shape
    size = _window_size(h, w, window)
    if size < 1:
        raise ValueError(f"images of {h}x{w} px are too small for SSIM")
    x, y = x.to(torch.float64), y.to(torch.float64)
    g = gaussian_window(size, sigma).to(x.device)
    down, across = _band(h, g).T, _band(w, g)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, per channel, valid windows only
        return down @ t @ across

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    out = s.mean(dim=(1, 2, 3)).to(torch.float32)
    return out[0] if single else out
