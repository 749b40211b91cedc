"""Synthetic images to bytes and back.

Encoding undoes the teachers' normalization: pixels = clamp(x * std + mean, 0, 1), rounded to the nearest
of 256 levels (the reference truncates instead), then JPEG (lossy, `quality`) or PNG (lossless) via Pillow;
one channel is written as greyscale, three as RGB. Decoding reverses it into normalized float tensors, so
relabel and evaluate see what a reader of the stored files sees.
"""
from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:  # the type only: importing prism_ray.data would pull the storage layer into the engine
    from prism_ray.data.base import Normalization

FORMATS = {"jpeg": ("JPEG", "jpg"), "png": ("PNG", "png")}


def file_extension(image_format: str) -> str:
    """'jpg' or 'png' for the config's image_format ('jpeg' or 'png')."""
    return _format(image_format)[1]


def _format(image_format: str) -> tuple[str, str]:
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(FORMATS)}, got {image_format!r}")
    return FORMATS[image_format]


def to_uint8(images: torch.Tensor, normalization: "Normalization") -> torch.Tensor:
    """Normalized (N, C, H, W) floats -> uint8 pixels: denormalize, clamp to [0, 1], round to 0..255."""
    pixels = normalization.denormalize(images.detach().float()).clamp_(0.0, 1.0)
    return pixels.mul_(255.0).round_().to(torch.uint8)


def encode_pixels(pixels: torch.Tensor, image_format: str = "jpeg", jpeg_quality: int = 75) -> bytes:
    """One uint8 (C, H, W) image, C in {1, 3}, to JPEG or PNG bytes."""
    pil_format, _ = _format(image_format)
    arr = pixels.cpu().permute(1, 2, 0).contiguous().numpy()
    if arr.shape[2] == 1:
        im = Image.fromarray(arr[:, :, 0])  # uint8 2-D: mode L
    elif arr.shape[2] == 3:
        im = Image.fromarray(arr)  # uint8 H x W x 3: mode RGB
    else:
        raise ValueError(f"can encode 1- or 3-channel images, got {arr.shape[2]} channels")
    buf = io.BytesIO()
    if pil_format == "JPEG":
        im.save(buf, format="JPEG", quality=jpeg_quality)
    else:
        im.save(buf, format="PNG")
    return buf.getvalue()


def encode_images(images: torch.Tensor, normalization: "Normalization", image_format: str = "jpeg",
                  jpeg_quality: int = 75) -> list[bytes]:
    """Normalized (N, C, H, W) images to one encoded file each."""
    return [encode_pixels(p, image_format, jpeg_quality) for p in to_uint8(images, normalization)]


def decode_pixels(data: bytes, channels: int) -> torch.Tensor:
    """Encoded bytes -> uint8 (channels, H, W)."""
    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def decode_image(data: bytes, normalization: "Normalization", channels: int | None = None) -> torch.Tensor:
    """Encoded bytes -> normalized float (C, H, W), C defaulting to the normalization's channel count."""
    c = channels if channels is not None else len(normalization.mean)
    return normalization.normalize(decode_pixels(data, c).float().div_(255.0))


def decode_images(blobs: Sequence[bytes], normalization: "Normalization", channels: int | None = None) -> torch.Tensor:
    """Several encoded images of one size -> normalized float (N, C, H, W)."""
    return torch.stack([decode_image(b, normalization, channels) for b in blobs])
