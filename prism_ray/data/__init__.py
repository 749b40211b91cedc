"""Data sets behind one class-indexed view; `build_dataset` picks the source the config names."""
from __future__ import annotations

import pyarrow as pa

from prism_ray.config import DataConfig, StorageConfig
from prism_ray.data.base import ClassIndexedDataset, DataError, Normalization, dataset_normalization
from prism_ray.data.index import DataIndex, index_name, list_split, open_dataset, read_index, source_mismatch, \
    data_source, split_uri

__all__ = ["ClassIndexedDataset", "DataError", "DataIndex", "Normalization", "build_dataset", "dataset_normalization",
           "normalization_for"]


def normalization_for(cfg: DataConfig) -> Normalization | None:
    if cfg.mean is not None and cfg.std is not None:
        return Normalization(tuple(cfg.mean), tuple(cfg.std))
    return None


def build_dataset(cfg: DataConfig, split: str, storage: StorageConfig | None = None,
                  class_names: list[str] | None = None, capped: bool = True,
                  index: DataIndex | str | None = None) -> ClassIndexedDataset:
    """The `split` ('train' or 'val') of the configured data set; `capped` applies data.max_per_class.

    `index`: the split's DataIndex, or the URI of a folder holding `<split>-index.parquet` (a run's
    RUN/data, `RunContext.index_uri`, or data.index): then nothing is listed. Without one, the split is
    listed here (val by `class_names`, the training classes, when given).
    """
    split_uri(cfg, split)  # a split the config lacks fails here, before any read
    if index is None:
        index = list_split(cfg, split, storage, class_names)
    elif isinstance(index, str):
        folder = index
        index = read_index(folder, split, storage, skip=("bytes",))
        if index is None:
            raise DataError(f"no data index {folder.rstrip('/')}/{index_name(split)}; rerun the pipeline (the driver "
                            f"writes it) or build it with `prism-ray index CONFIG --out {folder}`")
        problem = source_mismatch(index.source, data_source(cfg))
        if problem:
            raise DataError(f"the data index in {folder} was listed from other data ({problem}); rebuild it with "
                            f"`prism-ray index CONFIG --out {folder}`")
    dataset = open_dataset(index, cfg, storage, capped)
    # Reading the index leaves decoding buffers in Arrow's pool; hand them back, as workers live long.
    pa.default_memory_pool().release_unused()
    return dataset
