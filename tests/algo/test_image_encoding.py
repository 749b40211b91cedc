"""Encoding synthetic images (denormalize, clamp, round, JPEG/PNG) and reading them back."""
from __future__ import annotations

import pytest
import torch

from prism_ray.algo.encode import (decode_image, decode_images, decode_pixels, encode_images, encode_pixels,
                                   file_extension, to_uint8)
from prism_ray.data.base import Normalization

GREY = Normalization((0.2860,), (0.3530,))
RGB = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def smooth_images(n: int, c: int, size: int) -> torch.Tensor:
    """[0, 1] images with gradients and a blob: what JPEG handles well."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    imgs = []
    for i in range(n):
        chans = [(0.2 + 0.6 * (xs * (k + 1) + ys * (i + 1)) / (k + i + 2)) for k in range(c)]
        imgs.append(torch.stack(chans))
    return torch.stack(imgs).clamp(0, 1)


@pytest.mark.parametrize("norm,c", [(GREY, 1), (RGB, 3)])
def test_png_round_trip_is_exact(norm, c):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, c, 17, 13), generator=g, dtype=torch.uint8)
    x = norm.normalize(pixels.float() / 255)
    blobs = encode_images(x, norm, "png")
    assert all(b.startswith(b"\x89PNG") for b in blobs)
    assert torch.equal(torch.stack([decode_pixels(b, c) for b in blobs]), pixels)
    back = decode_images(blobs, norm)
    assert back.shape == x.shape
    assert torch.allclose(back, x, atol=1e-5)


@pytest.mark.parametrize("norm,c", [(GREY, 1), (RGB, 3)])
def test_jpeg_round_trip_is_close(norm, c):
    pixels = smooth_images(2, c, 64)
    x = norm.normalize(pixels)
    blobs = encode_images(x, norm, "jpeg", jpeg_quality=75)
    assert all(b.startswith(b"\xff\xd8") for b in blobs)
    back = norm.denormalize(decode_images(blobs, norm))
    assert (back - pixels).abs().mean() < 0.01
    assert (back - pixels).abs().max() < 0.1
    assert len(encode_images(x, norm, "jpeg", jpeg_quality=95)[0]) > len(blobs[0])


def test_to_uint8_denormalizes_clamps_and_rounds():
    levels = torch.tensor([0.0, 1 / 255, 0.5, 127.6 / 255, 1.0]).view(1, 1, 1, 5)
    got = to_uint8(GREY.normalize(levels), GREY)
    assert got.dtype == torch.uint8
    assert got.flatten().tolist() == [0, 1, 128, 128, 255]
    # values outside the valid pixel range are clamped, not wrapped
    out_of_range = GREY.normalize(torch.tensor([-0.5, 1.7]).view(1, 1, 1, 2))
    assert to_uint8(out_of_range, GREY).flatten().tolist() == [0, 255]


def test_decode_single_and_channel_conversion():
    pixels = (smooth_images(1, 3, 16)[0] * 255).round().to(torch.uint8)
    data = encode_pixels(pixels, "png")
    assert torch.equal(decode_pixels(data, 3), pixels)
    assert decode_pixels(data, 1).shape == (1, 16, 16)
    assert decode_image(data, RGB).shape == (3, 16, 16)


def test_file_extension_and_bad_format():
    assert file_extension("jpeg") == "jpg"
    assert file_extension("png") == "png"
    with pytest.raises(ValueError, match="image_format"):
        file_extension("webp")
    with pytest.raises(ValueError, match="channels"):
        encode_pixels(torch.zeros(2, 4, 4, dtype=torch.uint8), "png")
