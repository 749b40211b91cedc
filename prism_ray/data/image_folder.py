"""An ImageFolder tree at any fsspec URI: one folder per class (classes sorted), as ImageNet's train/val."""
from __future__ import annotations

import io
import posixpath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prism_ray.config import StorageConfig
from prism_ray.data.base import ClassIndexedDataset, DataError, Normalization
from prism_ray.storage import filesystem, translate_errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """Encoded image bytes -> uint8 CHW tensor (greyscale stays 1 channel, everything else RGB)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L") if im.mode in ("L", "I;16", "I", "1") else im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{name}: cannot decode image ({e})") from None
    t = torch.from_numpy(arr.copy())
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


class ImageFolderDataset(ClassIndexedDataset):
    def __init__(self, root: str, split: str, channels: int = 3, resolution: int = 224,
                 normalization: Normalization | None = None, classes: int | None = None,
                 max_per_class: int | None = None, class_names: list[str] | None = None,
                 storage: StorageConfig | None = None):
        self.root = root.rstrip("/")
        self._storage = storage
        self._fs, base = filesystem(root, storage)
        with translate_errors("cannot list", root):
            if not self._fs.isdir(base):
                raise DataError(f"image folder {root} not found or not a folder (data.{split})")
            files = sorted(p for p in self._fs.find(base) if p.lower().endswith(IMAGE_EXTENSIONS))
        by_folder: dict[str, list[str]] = {}
        for p in files:
            rel = p[len(base):].lstrip("/")
            if "/" not in rel:
                continue  # loose files at the top level belong to no class
            by_folder.setdefault(rel.split("/", 1)[0], []).append(p)
        found = sorted(by_folder)
        if class_names is None:
            class_names = found
        else:
            unknown = [c for c in found if c not in class_names]
            if unknown:
                raise DataError(f"{root}: class folders {unknown[:5]} are not training classes")
        if not class_names:
            raise DataError(f"{root}: no class folders with images ({', '.join(IMAGE_EXTENSIONS)}) found")
        self._paths: list[str] = []
        labels: list[int] = []
        for c, name in enumerate(class_names):
            for p in by_folder.get(name, []):
                self._paths.append(p)
                labels.append(c)
        norm = normalization or Normalization(*_default_stats(channels))
        super().__init__("image_folder", split, np.array(labels, dtype=np.int64), class_names, channels,
                         resolution, norm, classes, max_per_class)

    def reopen(self) -> None:
        self._fs, _ = filesystem(self.root, self._storage)

    def _raw(self, source_index: int) -> torch.Tensor:
        path = self._paths[source_index]
        with translate_errors("cannot read", path):
            data = self._fs.cat_file(path)
        return decode_image(data, path)

    def _raw_many(self, source_indices: np.ndarray) -> list[torch.Tensor]:
        paths = [self._paths[int(i)] for i in source_indices]
        with translate_errors("cannot read", self.root):
            blobs = self._fs.cat(paths) if len(paths) > 1 else {paths[0]: self._fs.cat_file(paths[0])}
        return [decode_image(blobs[p], p) for p in paths]


def _default_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from prism_ray.data.base import IMAGENET_STATS
    mean, std = IMAGENET_STATS
    if channels == 1:
        return (sum(mean) / 3,), (sum(std) / 3,)
    return mean, std
