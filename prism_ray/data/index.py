"""One data index per run: each split listed once, stored as Parquet, and read instead of a listing.

Listing ImageNet's 1.28 M training objects on S3 costs thousands of LIST requests and minutes; done in
every worker it is multiplied by the worker count (DESIGN.md section 8). The driver lists each split once
per run into RUN/data/{train,val}-index.parquet, or reads a shared index (`data.index`, made by
`prism-ray index`); workers, `plan` and resumed runs read that file. One row per image:

    image_folder    path (relative to the split's URI), class_id, bytes (object size, free in the listing)
    parquet         file (position in the metadata's file list), row_group, offset, class_id
    fashion_mnist   row (image number in the IDX file), class_id

Fashion-MNIST needs no listing (two fixed files) but takes the same path: the driver then treats every
data set alike (class names and counts come from the index, one record says where the data came from)
and workers no longer read the labels file.

The file's metadata holds the class names, the split, the data source it was listed from (`source`,
compared with the config whenever an index is read, so a run pointed at other data never uses a stale
index) and, for Parquet data sets, the data files. Listing is also where bad data is found, before a run
writes anything: empty class folders, validation classes the training set lacks, missing columns, and
(`data.verify`) images that do not decode.
"""
from __future__ import annotations

import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prism_ray.config import DataConfig, StorageConfig, resolved_resize
from prism_ray.data.base import ClassIndexedDataset, DataError, dataset_normalization
from prism_ray.data.fashion_mnist import CLASS_NAMES, FILES, FashionMNIST, idx_gz_length, read_idx_gz
from prism_ray.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset
from prism_ray.data.parquet_table import ParquetImageDataset, class_names_from_metadata, file_path
from prism_ray.storage import Storage, filesystem, parquet_table, read_object, table_bytes, translate_errors

INDEX_META = b"prism_ray_index"
FORMAT = 1
VERIFY_AUTO_LIMIT = 20_000  # data.verify: auto decodes every image of a split with at most this many
VERIFY_BATCH = 64  # images fetched at once while verifying
LIST_THREADS = 16  # class folders or Parquet files listed at once: S3 latency, not CPU, bounds a listing


def index_name(split: str) -> str:
    return f"{split}-index.parquet"


def resolve_uri(uri: str) -> str:
    """A URI as recorded and compared: local paths absolute, no trailing slash."""
    if "://" not in uri:
        return os.path.abspath(os.path.expanduser(uri))
    return uri.rstrip("/")


def split_uri(cfg: DataConfig, split: str) -> str:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if cfg.dataset == "fashion_mnist":
        return cfg.root
    uri = cfg.train if split == "train" else cfg.val
    if not uri:
        raise DataError(f"data.{split} is not set: the {cfg.dataset} data set needs a URI for its {split} split")
    return uri


def splits(cfg: DataConfig) -> list[str]:
    """The splits a run indexes: train, and val when the data set has one."""
    return ["train", "val"] if cfg.dataset == "fashion_mnist" or cfg.val else ["train"]


def data_source(cfg: DataConfig) -> dict:
    """What a listing depends on, keyed by config field: the data set kind, where its splits are, the columns."""
    if cfg.dataset == "fashion_mnist":
        return {"dataset": cfg.dataset, "root": resolve_uri(cfg.root)}
    src = {"dataset": cfg.dataset, "train": resolve_uri(cfg.train) if cfg.train else None,
           "val": resolve_uri(cfg.val) if cfg.val else None}
    if cfg.dataset == "parquet":
        src.update(image_column=cfg.image_column, label_column=cfg.label_column)
    return src


def source_mismatch(recorded: dict, current: dict) -> str | None:
    """How an index's recorded source differs from the config's, in config terms; None when it does not."""
    keys = sorted(set(recorded) | set(current))
    diff = [f"data.{k} is {recorded.get(k)!r} in the index but {current.get(k)!r} in the config"
            for k in keys if recorded.get(k) != current.get(k)]
    return "; ".join(diff) or None


@dataclass
class DataIndex:
    """One split, listed: a row per image, the class names, and the source it was listed from."""

    split: str
    source: dict
    class_names: list[str]
    table: pa.Table
    files: list[str] = field(default_factory=list)  # parquet: data files relative to the split's URI
    verified: bool = False  # every image was decoded when the index was built

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def dataset(self) -> str:
        return self.source["dataset"]

    def column(self, name: str) -> np.ndarray:
        return self.table.column(name).to_numpy()

    def labels(self) -> np.ndarray:
        return self.column("class_id").astype(np.int64)

    def counts(self) -> list[int]:
        return np.bincount(self.labels(), minlength=len(self.class_names)).tolist()

    def to_bytes(self) -> bytes:
        meta = {"format": FORMAT, "split": self.split, "source": self.source, "class_names": self.class_names,
                "files": self.files, "verified": self.verified}
        return table_bytes(self.table.replace_schema_metadata({INDEX_META: json.dumps(meta).encode()}))

    @classmethod
    def from_bytes(cls, data: bytes, name: str, skip: tuple[str, ...] = ()) -> DataIndex:
        """An index from its Parquet bytes, without the columns in `skip` (a reader needs no sizes)."""
        try:
            schema = pq.read_schema(pa.BufferReader(data))
            table = parquet_table(data, [c for c in schema.names if c not in skip])
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{name}: not a readable data index ({e}); rebuild it with `prism-ray index CONFIG`") \
                from None
        raw = (schema.metadata or {}).get(INDEX_META)
        if raw is None:
            raise DataError(f"{name}: not a prism-ray data index; build one with `prism-ray index CONFIG --out FOLDER`")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT:
            raise DataError(f"{name}: data index format {meta.get('format')!r}, this prism-ray reads {FORMAT}; "
                            f"rebuild it with `prism-ray index CONFIG`")
        return cls(meta["split"], meta["source"], meta["class_names"], table.replace_schema_metadata(None),
                   list(meta.get("files") or []), bool(meta.get("verified")))


# ------------------------------------------------------------------------------------ stored indexes


def read_index(folder: str, split: str, storage: StorageConfig | None = None,
               skip: tuple[str, ...] = ()) -> DataIndex | None:
    """The index of `split` in `folder` (one GET), or None when there is none; `skip`: columns not to load."""
    fs, base = filesystem(folder, storage)
    uri = f"{folder.rstrip('/')}/{index_name(split)}"
    with translate_errors("cannot read", uri):
        try:
            data = read_object(fs, posixpath.join(base, index_name(split)))
        except FileNotFoundError:
            return None
    return DataIndex.from_bytes(data, uri, skip)


def write_indexes(folder: str, indexes: dict[str, DataIndex], storage: StorageConfig | None = None) -> None:
    target = Storage(folder, storage)
    for split, index in indexes.items():
        target.write_bytes(index_name(split), index.to_bytes())


def load_indexes(cfg: DataConfig, folder: str, storage: StorageConfig | None = None,
                 shared: bool = False) -> dict[str, DataIndex] | None:
    """Every split's index in `folder`, when all are there and were listed from the configured data.

    A run's own index that is missing or stale gives None (the caller lists again); a shared one
    (`data.index`) that is missing or stale is an error: the user named it.
    """
    out = {}
    current = data_source(cfg)
    for split in splits(cfg):
        index = read_index(folder, split, storage)
        problem = f"no {index_name(split)} in {folder}" if index is None else source_mismatch(index.source, current)
        if problem:
            if shared:
                raise DataError(f"data.index: {problem}; build it with `prism-ray index CONFIG --out {folder}`, or "
                                f"leave data.index empty to list the data in the run")
            return None
        out[split] = index
    return out


# ------------------------------------------------------------------------------------ listing


def build_indexes(cfg: DataConfig, storage: StorageConfig | None = None, verify: bool = True) -> dict[str, DataIndex]:
    """List every split (train first: val rows carry training class ids), decoding every image where
    `data.verify` says so (`verify=False`: never, for a look that keeps nothing, as `plan`'s). Raises
    DataError, naming the file or field, on data a run cannot use."""
    out = {"train": list_split(cfg, "train", storage)}
    if "val" in splits(cfg):
        out["val"] = list_split(cfg, "val", storage, class_names=out["train"].class_names)
    for index in out.values():
        if verify and index.dataset != "fashion_mnist" and should_verify(cfg.verify, len(index)):
            verify_index(index, cfg, storage)
    return out


def list_split(cfg: DataConfig, split: str, storage: StorageConfig | None = None,
               class_names: list[str] | None = None) -> DataIndex:
    """List `split` of the configured data set (no image is read). `class_names`: the training classes,
    which a validation split must use."""
    uri, source = split_uri(cfg, split), data_source(cfg)
    if cfg.dataset == "fashion_mnist":
        return _list_fashion_mnist(uri, split, source, storage)
    if cfg.dataset == "image_folder":
        return _list_image_folder(uri, split, source, storage, class_names)
    return _list_parquet(uri, split, source, storage, cfg.image_column, cfg.label_column, class_names)


def _list_fashion_mnist(root: str, split: str, source: dict, storage: StorageConfig | None) -> DataIndex:
    images_file, labels_file = FILES[split]
    labels = read_idx_gz(root, labels_file, storage)
    n = idx_gz_length(root, images_file, storage)
    if n != len(labels) or labels.ndim != 1:
        raise DataError(f"{root}: {images_file} holds {n} images but {labels_file} {len(labels)} labels")
    if len(labels) and labels.max() >= len(CLASS_NAMES):
        raise DataError(f"{root}/{labels_file}: label {labels.max()} is not a Fashion-MNIST class (0..9)")
    table = pa.table({"row": pa.array(np.arange(len(labels), dtype=np.int32)),
                      "class_id": pa.array(labels.astype(np.int32))})
    return DataIndex(split, source, list(CLASS_NAMES), table)


def _visible(name: str) -> bool:
    """Hidden entries (.ipynb_checkpoints, macOS ._ files) are neither classes nor images."""
    return not posixpath.basename(name.rstrip("/")).startswith(".")


def _list_image_folder(uri: str, split: str, source: dict, storage: StorageConfig | None,
                       class_names: list[str] | None) -> DataIndex:
    fs, base = filesystem(uri, storage)
    uri, field_name = uri.rstrip("/"), f"data.{split}"
    with translate_errors("cannot list", uri):
        try:
            top = fs.ls(base, detail=True)
        except FileNotFoundError:
            raise DataError(f"{field_name}: image folder {uri} not found") from None
    folders = sorted(posixpath.basename(e["name"].rstrip("/")) for e in top
                     if e["type"] == "directory" and _visible(e["name"]))
    if not folders:
        raise DataError(f"{field_name}: {uri} has no class folders (one folder of images per class, as ImageNet's "
                        f"train/ and val/)")

    def list_folder(name: str) -> tuple[str, list[tuple[str, int | None]]]:
        path = f"{base}/{name}"
        with translate_errors("cannot list", f"{uri}/{name}"):
            found = fs.find(path, detail=True)
        fs.invalidate_cache(path)  # the filesystem's listing cache would otherwise grow to the whole data set
        files = []
        for p, info in found.items():
            rel = posixpath.relpath(p, base)
            if info.get("type") != "directory" and _visible(rel) and rel.lower().endswith(IMAGE_EXTENSIONS):
                files.append((rel, info.get("size")))
        return name, sorted(files)

    with ThreadPoolExecutor(min(LIST_THREADS, len(folders))) as pool:
        listed = dict(pool.map(list_folder, folders))
    empty = [n for n in folders if not listed[n]]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(f"{field_name}: class folder {uri}/{empty[0]} holds no images{more}; add its images or "
                        f"remove the folder (classes are the sorted folder names: an empty one shifts the rest)")
    if class_names is None:
        class_names = folders
    else:
        known = set(class_names)
        unknown = [n for n in folders if n not in known]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise DataError(f"{field_name}: class folder {uri}/{unknown[0]} is not a class of the training set "
                            f"(data.train has {len(class_names)} classes){more}; give both splits the same class "
                            f"folders")
    paths, ids, sizes = [], [], []
    for c, name in enumerate(class_names):
        for rel, size in listed.get(name, ()):
            paths.append(rel)
            ids.append(c)
            sizes.append(size)
    table = pa.table({"path": pa.array(paths, pa.string()), "class_id": pa.array(ids, pa.int32()),
                      "bytes": pa.array(sizes, pa.int64())})
    return DataIndex(split, source, list(class_names), table)


def _list_parquet(uri: str, split: str, source: dict, storage: StorageConfig | None, image_column: str,
                  label_column: str, class_names: list[str] | None) -> DataIndex:
    fs, base = filesystem(uri, storage)
    uri, field_name = uri.rstrip("/"), f"data.{split}"
    with translate_errors("cannot list", uri):
        if fs.isdir(base):
            files = sorted(posixpath.relpath(p, base) for p in fs.find(base) if p.endswith(".parquet") and _visible(p))
            if not files:
                raise DataError(f"{field_name}: no .parquet files under {uri}")
        elif fs.exists(base):
            files = [""]
        else:
            raise DataError(f"{field_name}: Parquet data {uri} not found")

    def scan(rel: str) -> tuple[pa.ChunkedArray, list[int], list[str] | None]:
        name = file_path(uri, rel)
        with translate_errors("cannot read", name):
            # No read-ahead: only the footer and the label column chunks are fetched, never image bytes.
            with fs.open(file_path(base, rel), "rb", cache_type="none") as f:
                pf = pq.ParquetFile(f, pre_buffer=True)
                schema = pf.schema_arrow
                for col, key in ((image_column, "data.image_column"), (label_column, "data.label_column")):
                    if col not in schema.names:
                        raise DataError(f"{name}: no column {col!r} ({key}); its columns are {', '.join(schema.names)}")
                if not pa.types.is_integer(schema.field(label_column).type):
                    raise DataError(f"{name}: column {label_column!r} (data.label_column) holds "
                                    f"{schema.field(label_column).type}, not integer class ids")
                labels = pf.read(columns=[label_column], use_threads=False).column(0)
                sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
        if labels.null_count:
            raise DataError(f"{name}: column {label_column!r} (data.label_column) has {labels.null_count} empty values")
        return labels, sizes, class_names_from_metadata(schema, label_column)

    with ThreadPoolExecutor(min(LIST_THREADS, len(files))) as pool:
        scanned = list(pool.map(scan, files))
    file_ids, row_groups, offsets, labels = [], [], [], []
    for fi, (lab, sizes, _) in enumerate(scanned):
        file_ids.append(np.full(len(lab), fi, np.int32))
        row_groups.append(np.repeat(np.arange(len(sizes), dtype=np.int32), sizes))
        offsets.extend(np.arange(n, dtype=np.int32) for n in sizes)
        labels.append(lab.to_numpy().astype(np.int64))
    all_labels = np.concatenate(labels)
    names_in_data = scanned[0][2]
    if class_names is None:
        class_names = names_in_data or [str(i) for i in range(int(all_labels.max()) + 1 if len(all_labels) else 0)]
    elif names_in_data and list(names_in_data) != list(class_names):
        raise DataError(f"{field_name}: the class names in {uri}'s metadata differ from the training set's; give both "
                        f"splits the same classes")
    if len(all_labels) and (all_labels.min() < 0 or all_labels.max() >= len(class_names)):
        raise DataError(f"{field_name}: {uri}: labels (data.label_column) must lie in 0..{len(class_names) - 1} "
                        f"(the {'training set' if split == 'val' else 'data set'}'s classes), found "
                        f"{all_labels.min()}..{all_labels.max()}")
    table = pa.table({"file": pa.array(np.concatenate(file_ids)), "row_group": pa.array(np.concatenate(row_groups)),
                      "offset": pa.array(np.concatenate(offsets) if offsets else np.zeros(0, np.int32)),
                      "class_id": pa.array(all_labels.astype(np.int32))})
    return DataIndex(split, source, list(class_names), table, files=files)


# ------------------------------------------------------------------------------------ reading, verifying


def open_dataset(index: DataIndex, cfg: DataConfig, storage: StorageConfig | None = None, capped: bool = True,
                 whole: bool = False) -> ClassIndexedDataset:
    """The reader of an indexed split: images are read on demand, nothing is listed. `whole`: every row,
    ignoring data.classes and data.max_per_class."""
    cap = cfg.max_per_class if (capped and index.split == "train") else None
    common = dict(normalization=dataset_normalization(cfg), channels=cfg.channels, resolution=cfg.resolution,
                  resize=resolved_resize(cfg),
                  classes=None if whole else cfg.classes, max_per_class=None if whole else cap, storage=storage)
    uri, labels = split_uri(cfg, index.split), index.labels()
    if index.dataset == "fashion_mnist":
        return FashionMNIST(uri, index.split, labels, **common)
    if index.dataset == "image_folder":
        paths = index.table.column("path")
        paths = paths.chunk(0) if paths.num_chunks == 1 else paths.combine_chunks()  # one chunk: no copy
        return ImageFolderDataset(uri, index.split, paths, labels, index.class_names, **common)
    return ParquetImageDataset(uri, index.split, index.files, index.column("file"), index.column("row_group"),
                               index.column("offset"), labels, index.class_names, image_column=cfg.image_column,
                               **common)


def should_verify(setting: str | bool, images: int) -> bool:
    """data.verify: true / false, or auto: splits of at most VERIFY_AUTO_LIMIT images."""
    return images <= VERIFY_AUTO_LIMIT if setting == "auto" else bool(setting)


def verify_index(index: DataIndex, cfg: DataConfig, storage: StorageConfig | None = None) -> None:
    """Read and decode every image of the split; the first one that fails is named in a DataError."""
    reader = open_dataset(index, cfg, storage, whole=True)
    try:
        for start in range(0, len(index), VERIFY_BATCH):
            reader._raw_many(np.arange(start, min(start + VERIFY_BATCH, len(index))))
    except DataError as e:
        raise DataError(f"data.{index.split}: {e}") from None
    index.verified = True
