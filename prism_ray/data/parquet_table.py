"""A Parquet image table (an image-bytes column and a label column), as common ImageNet-1K exports have.

Labels are read up front (one small column); images are read lazily a row group at a time, so a
150 GB table is never held in memory.
"""
from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prism_ray.config import StorageConfig
from prism_ray.data.base import ClassIndexedDataset, DataError, Normalization
from prism_ray.data.image_folder import _default_stats, decode_image
from prism_ray.storage import filesystem, translate_errors


def _class_names_from_metadata(schema: pa.Schema, label_column: str) -> list[str] | None:
    """Hugging Face exports carry ClassLabel names in the schema metadata."""
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][label_column]
        names = feature.get("names")
        return list(names) if names else None
    except (KeyError, TypeError, ValueError):
        return None


class ParquetImageDataset(ClassIndexedDataset):
    def __init__(self, uri: str, split: str, channels: int = 3, resolution: int = 224,
                 normalization: Normalization | None = None, classes: int | None = None,
                 max_per_class: int | None = None, image_column: str = "image", label_column: str = "label",
                 class_names: list[str] | None = None, storage: StorageConfig | None = None):
        self.uri = uri
        self._storage = storage
        self._fs, base = filesystem(uri, storage)
        self._image_column = image_column
        with translate_errors("cannot read", uri):
            if self._fs.isdir(base):
                self._files = sorted(p for p in self._fs.find(base) if p.endswith(".parquet"))
            elif self._fs.exists(base):
                self._files = [base]
            else:
                raise DataError(f"Parquet data {uri} not found (data.{split})")
            if not self._files:
                raise DataError(f"{uri}: no .parquet files found")
            self._handles = [pq.ParquetFile(self._fs.open(p, "rb")) for p in self._files]
        schema = self._handles[0].schema_arrow
        for col in (image_column, label_column):
            if col not in schema.names:
                field = "data.image_column" if col == image_column else "data.label_column"
                raise DataError(f"{uri}: no column {col!r} ({field}); columns are {', '.join(schema.names)}")
        # location of every row: (file, row group, offset within the group)
        labels, self._where = [], []
        for fi, handle in enumerate(self._handles):
            for rg in range(handle.num_row_groups):
                col = handle.read_row_group(rg, columns=[label_column]).column(0).to_numpy(zero_copy_only=False)
                labels.append(np.asarray(col, dtype=np.int64))
                self._where.extend((fi, rg, off) for off in range(len(col)))
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        if class_names is None:
            class_names = _class_names_from_metadata(schema, label_column)
        if class_names is None:
            n = int(all_labels.max()) + 1 if len(all_labels) else 0
            class_names = [str(i) for i in range(n)]
        if len(all_labels) and (all_labels.min() < 0 or all_labels.max() >= len(class_names)):
            raise DataError(f"{uri}: labels must lie in 0..{len(class_names) - 1}, found {all_labels.min()}.."
                            f"{all_labels.max()}")
        self._cache: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()
        norm = normalization or Normalization(*_default_stats(channels))
        super().__init__("parquet", split, all_labels, class_names, channels, resolution, norm, classes,
                         max_per_class)

    def reopen(self) -> None:
        self._fs, _ = filesystem(self.uri, self._storage)
        with translate_errors("cannot read", self.uri):
            self._handles = [pq.ParquetFile(self._fs.open(p, "rb")) for p in self._files]
        self._cache.clear()

    def _group(self, fi: int, rg: int) -> pa.Array:
        key = (fi, rg)
        if key not in self._cache:
            with translate_errors("cannot read", self._files[fi]):
                col = self._handles[fi].read_row_group(rg, columns=[self._image_column]).column(0)
            self._cache[key] = col.combine_chunks()
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _raw(self, source_index: int) -> torch.Tensor:
        fi, rg, off = self._where[source_index]
        value = self._group(fi, rg)[off].as_py()
        if isinstance(value, dict):  # {"bytes": ..., "path": ...} as Hugging Face writes images
            value = value.get("bytes")
        if not isinstance(value, (bytes, bytearray)):
            raise DataError(f"{self.uri}: row {source_index} of column {self._image_column!r} holds no image bytes")
        return decode_image(bytes(value), f"{self.uri} row {source_index}")
