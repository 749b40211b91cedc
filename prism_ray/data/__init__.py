"""Data sets behind one class-indexed view; `build_dataset` picks the source the config names."""
from __future__ import annotations

from prism_ray.config import DataConfig, StorageConfig
from prism_ray.data.base import ClassIndexedDataset, DataError, Normalization
from prism_ray.data.fashion_mnist import FashionMNIST
from prism_ray.data.image_folder import ImageFolderDataset
from prism_ray.data.parquet_table import ParquetImageDataset

__all__ = ["ClassIndexedDataset", "DataError", "Normalization", "build_dataset", "normalization_for"]


def normalization_for(cfg: DataConfig) -> Normalization | None:
    if cfg.mean is not None and cfg.std is not None:
        return Normalization(tuple(cfg.mean), tuple(cfg.std))
    return None


def build_dataset(cfg: DataConfig, split: str, storage: StorageConfig | None = None,
                  class_names: list[str] | None = None, capped: bool = True) -> ClassIndexedDataset:
    """The `split` ('train' or 'val') of the configured data set; `capped` applies data.max_per_class."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    cap = cfg.max_per_class if (capped and split == "train") else None
    common = dict(channels=cfg.channels, resolution=cfg.resolution, normalization=normalization_for(cfg),
                  classes=cfg.classes, max_per_class=cap, storage=storage)
    if cfg.dataset == "fashion_mnist":
        return FashionMNIST(cfg.root, split, **common)
    uri = cfg.train if split == "train" else cfg.val
    if not uri:
        raise DataError(f"data.{split} is not set: the {cfg.dataset} data set needs a URI for its {split} split")
    if cfg.dataset == "image_folder":
        return ImageFolderDataset(uri, split, class_names=class_names, **common)
    return ParquetImageDataset(uri, split, image_column=cfg.image_column, label_column=cfg.label_column,
                               class_names=class_names, **common)
