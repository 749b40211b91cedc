"""Fashion-MNIST from its IDX .gz files (Debian package `dataset-fashion-mnist`, or any folder/URI)."""
from __future__ import annotations

import gzip
import posixpath
import zlib

import numpy as np
import torch

from prism_ray.config import StorageConfig
from prism_ray.data.base import ClassIndexedDataset, DataError, Normalization
from prism_ray.storage import filesystem, read_object, translate_errors

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
HOW_TO_GET = ("install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist, files "
              "under /usr/share/datasets/fashion-mnist/) or point data.root at a folder holding "
              "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
              "t10k-labels-idx1-ubyte.gz")


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """An IDX array (big-endian header: zero, zero, dtype code, ndim, then the sizes)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{name}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{name}: header says {tuple(dims)} but holds {body.size} values (truncated?)")
    return body.reshape(tuple(dims))


def _missing(root: str, filename: str) -> DataError:
    return DataError(f"Fashion-MNIST file {root.rstrip('/')}/{filename} not found (data.root); {HOW_TO_GET}")


def read_idx_gz(root: str, filename: str, storage: StorageConfig | None) -> np.ndarray:
    fs, base = filesystem(root, storage)
    path = posixpath.join(base, filename)
    with translate_errors("cannot read", f"{root}/{filename}"):
        try:
            raw = read_object(fs, path)
        except FileNotFoundError:
            raise _missing(root, filename) from None
    try:
        return parse_idx(gzip.decompress(raw), filename)
    except (OSError, EOFError) as e:
        raise DataError(f"{root}/{filename}: not a readable .gz file ({e})") from None


def idx_gz_length(root: str, filename: str, storage: StorageConfig | None) -> int:
    """The item count in an IDX .gz file's header, from its first kilobytes (one ranged read)."""
    fs, base = filesystem(root, storage)
    with translate_errors("cannot read", f"{root}/{filename}"):
        try:
            head = fs.cat_file(posixpath.join(base, filename), start=0, end=4096)
        except FileNotFoundError:
            raise _missing(root, filename) from None
    try:
        header = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 8)
    except zlib.error as e:
        raise DataError(f"{root}/{filename}: not a readable .gz file ({e})") from None
    if len(header) < 8 or header[:3] != b"\0\0\x08":
        raise DataError(f"{root}/{filename}: not an unsigned-byte IDX file")
    return int.from_bytes(header[4:8], "big")


class FashionMNIST(ClassIndexedDataset):
    """The IDX images of a split with labels from its index (the labels file, read once by the driver)."""

    def __init__(self, root: str, split: str, labels: np.ndarray, normalization: Normalization, channels: int = 1,
                 resolution: int = 28, classes: int | None = None, max_per_class: int | None = None,
                 storage: StorageConfig | None = None, resize: int | None = None):
        images_file, _ = FILES[split]
        self._images = read_idx_gz(root, images_file, storage)
        if len(labels) != len(self._images):
            raise DataError(f"{root}/{images_file} holds {len(self._images)} images but the data index lists "
                            f"{len(labels)}: the files changed since the index was built; rebuild it with "
                            f"`prism-ray index CONFIG`")
        super().__init__("fashion_mnist", split, labels, CLASS_NAMES, channels, resolution, normalization, classes,
                         max_per_class, resize)

    def _raw(self, source_index: int) -> torch.Tensor:
        return torch.from_numpy(self._images[source_index].copy())[None]

    def _raw_many(self, source_indices: np.ndarray) -> list[torch.Tensor]:
        block = torch.from_numpy(self._images[np.asarray(source_indices, dtype=np.int64)].copy())[:, None]
        return list(block)
