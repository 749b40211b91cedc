"""An ImageFolder tree at any fsspec URI: one folder per class (classes sorted), as ImageNet's train/val.

The reader never lists: it is handed the split's index (relative paths and class ids, `data/index.py`)
and reads the images it is asked for, so a worker makes one GET per image and no LIST.
"""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, UnidentifiedImageError

from prism_ray.config import StorageConfig
from prism_ray.data.base import ClassIndexedDataset, DataError, Normalization
from prism_ray.storage import filesystem, read_objects, translate_errors

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
GREY_MODES = ("L", "LA", "La", "1", "F")
REBUILD_HINT = "rebuild the data index with `prism-ray index CONFIG` (it lists the data again)"


def _sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    """16-bit samples to 8 bits by scaling (round(v / 257)): PIL's convert('L') clips them at 255 instead."""
    return ((np.clip(arr.astype(np.int64), 0, 65535) + 128) // 257).astype(np.uint8)


def decode_image(data: bytes, name: str) -> torch.Tensor:
    """Encoded image bytes -> uint8 CHW tensor (greyscale stays 1 channel, everything else RGB).

    CMYK and palette images are converted to RGB, 16-bit greyscale is scaled to 8 bits (16-bit RGB PNGs
    PIL already reads as their high bytes), alpha is dropped.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode.startswith("I;16") or im.mode == "I":
                arr = _sixteen_to_eight(np.asarray(im))
            else:
                arr = np.asarray(im.convert("L") if im.mode in GREY_MODES else im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot decode image ({e}); replace or remove the file (if you remove it, "
                        f"{REBUILD_HINT})") from None
    t = torch.from_numpy(arr.copy())
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


class ImageFolderDataset(ClassIndexedDataset):
    """Images `paths[i]` (relative to `uri`) with class ids `labels[i]`, read on demand.

    Paths stay one Arrow string array (two buffers), not a Python list: 1.28 M ImageNet paths cost about
    45 MB this way. The filesystem is opened lazily per process, so the dataset pickles small and works in
    DataLoader worker processes.
    """

    def __init__(self, uri: str, split: str, paths: pa.Array | Sequence[str], labels: np.ndarray,
                 class_names: list[str], normalization: Normalization, channels: int = 3, resolution: int = 224,
                 classes: int | None = None, max_per_class: int | None = None,
                 storage: StorageConfig | None = None, resize: int | None = None):
        self.uri = uri.rstrip("/")
        self._storage = storage
        self._paths = paths if isinstance(paths, pa.Array) else pa.array(list(paths), pa.string())
        self._fs, self._base, self._pid = None, None, None
        super().__init__("image_folder", split, labels, class_names, channels, resolution, normalization, classes,
                         max_per_class, resize)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_fs=None, _base=None, _pid=None)  # an fsspec filesystem does not survive pickling or fork
        return state

    def _filesystem(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._base = filesystem(self.uri, self._storage)
            self._pid = os.getpid()
        return self._fs, self._base

    def _read(self, rels: list[str]) -> dict[str, bytes]:
        """The bytes of images `rels`, fetched concurrently."""
        fs, base = self._filesystem()
        rels = list(dict.fromkeys(rels))
        with translate_errors("cannot read", self.uri):
            blobs = read_objects(fs, [f"{base}/{rel}" for rel in rels])
            for rel, blob in zip(rels, blobs):
                if isinstance(blob, FileNotFoundError):
                    raise DataError(f"{self.uri}/{rel}: listed in the data index but gone: the data changed since "
                                    f"the index was built; {REBUILD_HINT}")
                if isinstance(blob, BaseException):
                    raise blob
        return dict(zip(rels, blobs))

    def reopen(self) -> None:
        self._fs, self._base, self._pid = None, None, None  # opened again on first use in this process

    def _raw(self, source_index: int) -> torch.Tensor:
        rel = self._paths[source_index].as_py()
        return decode_image(self._read([rel])[rel], f"{self.uri}/{rel}")

    def _raw_many(self, source_indices: np.ndarray) -> list[torch.Tensor]:
        rels = self._paths.take(pa.array(np.asarray(source_indices, dtype=np.int64))).to_pylist()
        blobs = self._read(rels)
        return [decode_image(blobs[rel], f"{self.uri}/{rel}") for rel in rels]
