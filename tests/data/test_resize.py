"""Real-image preprocessing (data.resize): torchvision's Resize(256) + CenterCrop(224), the ImageNet protocol of
the PRISM and SRe2L code for validation and real initial images, on real JPEG files of several aspect ratios."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from prism_ray.config import ConfigError, DataConfig, resolved_resize
from prism_ray.config_loader import load_config
from prism_ray.data import build_dataset
from prism_ray.stages.squeeze import data_fingerprint

# (width, height): landscape and portrait 4:3, 2:3, a wide panorama, nearly square, square, and an image whose
# shorter side is below 256 (upsampled) or already 256 (kept)
SIZES = [(500, 375), (375, 500), (333, 500), (1000, 300), (300, 299), (256, 256), (320, 320), (224, 240),
         (256, 400)]


def photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG with photo-like content: smooth shading, fine texture, a sharp-edged object."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([128 + 100 * np.sin(x / (11.0 + 3 * c) + c) * np.cos(y / (19.0 - 2 * c)) for c in range(3)], -1)
    img += rng.normal(0, 20, img.shape)
    img[height // 3:height // 2, width // 4:width // 2] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """An ImageFolder of one class per aspect ratio (two images each), and the torchvision reference tensors."""
    root = tmp_path_factory.mktemp("jpegs")
    reference = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    want = {}
    for c, (w, h) in enumerate(SIZES):
        folder = root / f"c{c:02d}_{w}x{h}"
        folder.mkdir()
        for k in range(2):
            blob = photo(w, h, seed=10 * c + k)
            (folder / f"img{k}.JPEG").write_bytes(blob)
            with Image.open(io.BytesIO(blob)) as im:
                want[(c, k)] = reference(im.convert("RGB"))
    return root, want


def _levels(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round()


def test_real_images_equal_torchvision_resize_256_center_crop_224(jpeg_folder):
    root, want = jpeg_folder
    cfg = DataConfig(dataset="image_folder", train=str(root), val=str(root), channels=3, resolution=224)
    assert resolved_resize(cfg) == 256  # the default for 224-px ImageNet-style data
    train = build_dataset(cfg, "train")
    worst = 0.0
    for c in range(len(SIZES)):
        for k in range(2):
            got = train.pixels_at([c], k)[0]  # real init and random real read this
            assert got.shape == (3, 224, 224)
            worst = max(worst, (_levels(got) - _levels(want[(c, k)])).abs().max().item())
    assert worst <= 1.0  # PIL rounds to 8 bits between its two resize passes: one level of 255 at most
    # the validation path: DataLoader batches of items (here a class's two same-sized images: square ones are
    # resized together), normalized
    val = build_dataset(cfg, "val", class_names=train.class_names)
    for c in range(len(SIZES)):
        items = val.__getitems__([2 * c, 2 * c + 1])
        for k, (x, label) in enumerate(items):
            assert label == c
            pixels = val.normalization.denormalize(x)
            assert (_levels(pixels) - _levels(want[(c, k)])).abs().max().item() <= 1.0


def test_the_old_protocol_is_a_named_option_and_differs(jpeg_folder):
    root, want = jpeg_folder
    cfg = DataConfig(dataset="image_folder", train=str(root), channels=3, resolution=224, resize=224)
    wide = build_dataset(cfg, "train").pixels_at([0], 0)[0]  # shorter side to 224: the wider view
    assert wide.shape == (3, 224, 224)
    assert (_levels(wide) - _levels(want[(0, 0)])).abs().max().item() > 10


def test_resize_defaults_and_fingerprint():
    fm = load_config().data
    assert (fm.resize, resolved_resize(fm)) == (None, 28)  # small images: no margin
    assert resolved_resize(DataConfig(dataset="parquet", train="x", channels=3, resolution=224)) == 256
    assert resolved_resize(DataConfig(dataset="image_folder", train="x", channels=3, resolution=64)) == 64
    # a run made before data.resize existed keeps its fingerprint; another resize changes every real image
    assert "resize" not in data_fingerprint(load_config())
    imagenet = ["data.dataset=image_folder", "data.train=/x", "data.channels=3", "data.resolution=224"]
    assert data_fingerprint(load_config(overrides=imagenet))["resize"] == 256
    assert data_fingerprint(load_config(overrides=[*imagenet, "data.resize=288"]))["resize"] == 288
    assert "resize" not in data_fingerprint(load_config(overrides=[*imagenet, "data.resize=224"]))
    with pytest.raises(ConfigError, match="data.resize"):
        load_config(overrides=[*imagenet, "data.resize=200"])
