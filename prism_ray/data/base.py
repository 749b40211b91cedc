"""A class-indexed view over an image data set: "the k-th training image of class c", names, counts.

Each source (IDX files, an ImageFolder tree, a Parquet table) only says how to read raw image number i
and what the labels are; resizing, channel conversion and normalization are shared here so that every
source gives the teachers the same kind of tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from prism_ray.config import DataConfig


class DataError(ValueError):
    """The data set is missing or malformed: the message says which file and what to do."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std; images live in normalized space while teachers read them."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def _shape(self, x: torch.Tensor, values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=x.dtype, device=x.device).view(-1, 1, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> normalized space (x - mean) / std; works on CHW or NCHW."""
        return (x - self._shape(x, self.mean)) / self._shape(x, self.std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized space -> [0, 1] pixels (not clamped)."""
        return x * self._shape(x, self.std) + self._shape(x, self.mean)

    def bounds(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of valid pixels in normalized space, shaped (C, 1, 1) like `like`."""
        mean, std = self._shape(like, self.mean), self._shape(like, self.std)
        return (0 - mean) / std, (1 - mean) / std


FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def dataset_normalization(cfg: DataConfig) -> Normalization:
    """What images of the configured data set are normalized with: data.mean/std, else the source's usual
    statistics (Fashion-MNIST's, or ImageNet's, averaged for one channel). Needs no data."""
    if cfg.mean is not None and cfg.std is not None:
        return Normalization(tuple(cfg.mean), tuple(cfg.std))
    if cfg.dataset == "fashion_mnist":
        (mean,), (std,) = FASHION_MNIST_STATS
        return Normalization((mean,) * cfg.channels, (std,) * cfg.channels)
    mean, std = IMAGENET_STATS
    if cfg.channels == 1:
        return Normalization((sum(mean) / 3,), (sum(std) / 3,))
    return Normalization(mean, std)


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8/float CHW image to `channels` (grey repeated to RGB, RGB to luminance)."""
    c = x.shape[0]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(3, -1, -1)
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, 1, 1)
        return (x.float() * w).sum(0, keepdim=True).round().clamp(0, 255).to(x.dtype)
    if c == 4:
        return to_channels(x[:3], channels)
    raise DataError(f"cannot convert a {c}-channel image to {channels} channels")


def resize_center(x: torch.Tensor, resolution: int, resize: int | None = None) -> torch.Tensor:
    """Float CHW: shorter side to `resize` (default `resolution`), then a centre crop to a square of `resolution`.

    torchvision's Resize(resize) + CenterCrop(resolution) on a PIL image, value for value: the longer side
    becomes int(resize * long / short), the crop starts at round((side - resolution) / 2), and the resize is
    antialiased bilinear. PIL rounds to 8 bits between its two passes, so pixels agree within one level of 255
    (tests/data/test_resize.py).
    """
    size = resize or resolution
    _, h, w = x.shape
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nh, nw = (size, new_long) if h <= w else (new_long, size)
    if (nh, nw) != (h, w):
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    if nh == nw == resolution:
        return x
    top, left = int(round((nh - resolution) / 2.0)), int(round((nw - resolution) / 2.0))
    return x[:, top:top + resolution, left:left + resolution]


class ClassIndexedDataset(torch.utils.data.Dataset):
    """Map-style dataset of (normalized float CHW tensor, label), indexable by (class, k) as well."""

    def __init__(self, name: str, split: str, labels: np.ndarray, class_names: list[str], channels: int,
                 resolution: int, normalization: Normalization, classes: int | None = None,
                 max_per_class: int | None = None, resize: int | None = None):
        self.name, self.split = name, split
        self.channels, self.resolution, self.normalization = channels, resolution, normalization
        self.resize = resize or resolution  # shorter side before the centre crop (data.resize)
        labels = np.asarray(labels, dtype=np.int64)
        num_classes = len(class_names)
        if classes is not None:
            if classes > num_classes:
                raise DataError(f"data.classes={classes} but {name} has only {num_classes} classes")
            num_classes = classes
        self.class_names = list(class_names[:num_classes])
        # Positions (in the source) of each class's images, in source order, optionally capped: one stable
        # sort instead of a pass over all labels per class (1.28 M labels x 1000 classes).
        order = np.argsort(labels, kind="stable").astype(np.int32 if len(labels) < 2**31 else np.int64)
        bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
        by_class = [order[bounds[c]:bounds[c + 1]] for c in range(num_classes)]
        if max_per_class is not None:
            by_class = [idx[:max_per_class] for idx in by_class]
        self._by_class = by_class
        self._source_index = np.sort(np.concatenate(by_class)) if by_class else np.zeros(0, np.int64)
        self.labels = labels[self._source_index]

    # ---- what a source implements

    def _raw(self, source_index: int) -> torch.Tensor:
        """uint8 CHW tensor of source image `source_index`, any size and channel count."""
        raise NotImplementedError

    def _raw_many(self, source_indices: np.ndarray) -> list[torch.Tensor]:
        return [self._raw(int(i)) for i in source_indices]

    # ---- the class-indexed view

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def counts(self) -> list[int]:
        return [len(idx) for idx in self._by_class]

    def count(self, class_id: int) -> int:
        return len(self._by_class[class_id])

    def source_index(self, class_id: int, k: int) -> int:
        idx = self._by_class[class_id]
        if not 0 <= k < len(idx):
            raise DataError(f"{self.name} {self.split}: class {class_id} ({self.class_names[class_id]}) has "
                            f"{len(idx)} images, image {k} was asked for")
        return int(idx[k])

    def image(self, class_id: int, k: int) -> torch.Tensor:
        """The k-th image of class `class_id`, as the teachers see it."""
        return self._prepare(self._raw(self.source_index(class_id, k)))

    def images_at(self, class_ids: Sequence[int], k: int) -> torch.Tensor:
        """The k-th image of each class in `class_ids`, stacked (N, C, H, W)."""
        src = np.array([self.source_index(c, k) for c in class_ids])
        return self._prepare_batch(self._raw_many(src))

    def pixels_at(self, class_ids: Sequence[int], k: int) -> torch.Tensor:
        """Like `images_at` but [0, 1] pixels before normalization."""
        src = np.array([self.source_index(c, k) for c in class_ids])
        return self._pixels_batch(self._raw_many(src))

    def _pixels(self, raw: torch.Tensor) -> torch.Tensor:
        x = to_channels(raw, self.channels).float().div_(255.0)
        return resize_center(x, self.resolution, self.resize).clamp_(0, 1)

    def _prepare(self, raw: torch.Tensor) -> torch.Tensor:
        return self.normalization.normalize(self._pixels(raw))

    def _pixels_batch(self, raws: list[torch.Tensor]) -> torch.Tensor:
        if raws and all(r.shape == raws[0].shape for r in raws):  # one resize for the whole batch
            x = torch.stack([to_channels(r, self.channels) for r in raws]).float().div_(255.0)
            _, _, h, w = x.shape
            if (h, w) != (self.resolution, self.resolution):
                if h != w:
                    x = torch.stack([resize_center(i, self.resolution, self.resize) for i in x])
                else:  # square: one batched resize to the shorter side, then the centre crop
                    if h != self.resize:
                        x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", antialias=True,
                                          align_corners=False)
                    top = int(round((self.resize - self.resolution) / 2.0))
                    x = x[:, :, top:top + self.resolution, top:top + self.resolution]
            return x.clamp_(0, 1)
        return torch.stack([self._pixels(r) for r in raws])

    def _prepare_batch(self, raws: list[torch.Tensor]) -> torch.Tensor:
        return self.normalization.normalize(self._pixels_batch(raws))

    def __len__(self) -> int:
        return len(self._source_index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._prepare(self._raw(int(self._source_index[i]))), int(self.labels[i])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Items `indices` read together (a DataLoader batch): one concurrent fetch on S3, one batched resize."""
        idx = np.asarray(indices, dtype=np.int64)
        x = self._prepare_batch(self._raw_many(self._source_index[idx]))
        return [(x[j], int(self.labels[i])) for j, i in enumerate(idx)]

    def reopen(self) -> None:
        """Re-create process-bound handles (filesystems, open files) in a forked DataLoader worker: an S3
        filesystem refuses to be used in a child process. Sources that hold such handles override it."""

    def tensors(self, indices: Sequence[int] | None = None, batch: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """All (or the chosen) items as one (x, y) pair of tensors: for small data sets held in memory."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        xs = []
        for start in range(0, len(idx), batch):
            src = self._source_index[idx[start:start + batch]]
            xs.append(self._prepare_batch(self._raw_many(src)))
        x = torch.cat(xs) if xs else torch.zeros(0, self.channels, self.resolution, self.resolution)
        return x, torch.from_numpy(self.labels[idx].copy())

    def describe(self) -> str:
        crop = f", shorter side {self.resize} then centre crop" if self.resize != self.resolution else ""
        return (f"{self.name} {self.split}: {len(self)} images, {self.num_classes} classes, "
                f"{self.channels}x{self.resolution}x{self.resolution}{crop}")
