"""A Parquet image table (an image-bytes column and a label column), as common ImageNet-1K exports have.

The reader is handed the split's index (file, row group, offset and class id of every row, made by
`data/index.py` from the label column alone) and reads image bytes lazily, a row group at a time, so a
150 GB table is never held in memory and nothing is listed.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prism_ray.config import StorageConfig
from prism_ray.data.base import ClassIndexedDataset, DataError, Normalization
from prism_ray.data.image_folder import REBUILD_HINT, decode_image
from prism_ray.storage import filesystem, translate_errors

ROW_GROUPS_KEPT = 4  # decoded-column cache per reader: a few row groups, not the table


def class_names_from_metadata(schema: pa.Schema, label_column: str) -> list[str] | None:
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


def file_path(base: str, rel: str) -> str:
    """A data file's path: `rel` is relative to the split's URI, '' when the URI is the file itself."""
    return f"{base}/{rel}" if rel else base


class ParquetImageDataset(ClassIndexedDataset):
    def __init__(self, uri: str, split: str, files: list[str], file_ids: np.ndarray, row_groups: np.ndarray,
                 offsets: np.ndarray, labels: np.ndarray, class_names: list[str], normalization: Normalization,
                 channels: int = 3, resolution: int = 224, classes: int | None = None,
                 max_per_class: int | None = None, image_column: str = "image", storage: StorageConfig | None = None,
                 resize: int | None = None):
        self.uri = uri.rstrip("/")
        self._storage = storage
        self._image_column = image_column
        self._files = list(files)
        # Where every row is: three small integer arrays, not 1.28 M tuples.
        self._file_ids = np.asarray(file_ids, dtype=np.int32)
        self._row_groups = np.asarray(row_groups, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int32)
        self._reset_handles()
        super().__init__("parquet", split, labels, class_names, channels, resolution, normalization, classes,
                         max_per_class, resize)

    def _reset_handles(self) -> None:
        self._fs, self._base, self._pid = None, None, None
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_fs=None, _base=None, _pid=None, _handles={}, _cache=OrderedDict())
        return state

    def _handle(self, fi: int) -> pq.ParquetFile:
        if self._fs is None or self._pid != os.getpid():  # filesystems and open files do not survive a fork
            self._reset_handles()
            self._fs, self._base = filesystem(self.uri, self._storage)
            self._pid = os.getpid()
        if fi not in self._handles:
            path = file_path(self._base, self._files[fi])
            with translate_errors("cannot read", self.uri):
                try:
                    self._handles[fi] = pq.ParquetFile(self._fs.open(path, "rb"))
                except FileNotFoundError:
                    raise DataError(f"{self.uri}: data file {self._files[fi] or self.uri} listed in the data index "
                                    f"is gone; {REBUILD_HINT}") from None
        return self._handles[fi]

    def reopen(self) -> None:
        self._reset_handles()  # opened again on first use in this process

    def _group(self, fi: int, rg: int) -> pa.Array:
        key = (fi, rg)
        if key not in self._cache:
            handle = self._handle(fi)
            with translate_errors("cannot read", file_path(self.uri, self._files[fi])):
                col = handle.read_row_group(rg, columns=[self._image_column], use_threads=False).column(0)
            self._cache[key] = col.combine_chunks()
            while len(self._cache) > ROW_GROUPS_KEPT:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def _raw(self, source_index: int) -> torch.Tensor:
        fi, rg, off = int(self._file_ids[source_index]), int(self._row_groups[source_index]), \
            int(self._offsets[source_index])
        value = self._group(fi, rg)[off].as_py()
        if isinstance(value, dict):  # {"bytes": ..., "path": ...} as Hugging Face writes images
            value = value.get("bytes")
        where = f"{file_path(self.uri, self._files[fi])} row group {rg} row {off}"
        if not isinstance(value, (bytes, bytearray)):
            raise DataError(f"{where}: column {self._image_column!r} (data.image_column) holds no image bytes")
        return decode_image(bytes(value), where)
