"""An image set made elsewhere (an SRe2L, PRISM, RDED or G-VBSM release, a prism-ray export, a folder of
images): listed once, mapped to the run's classes and checked image by image before anything of it is
committed.

The rules (docs/sets.md says them for users):
- Classes, ImageFolder: each top-level folder is one class. Either every folder is named like a class of the
  training data (its name, with '/' and '\\' written '_', optionally after the class number, ``007_Sneaker``,
  as prism-ray exports name them when the names do not sort in class order), or every folder is numbered:
  ``new007`` (what SRe2L's and PRISM's recover write), ``class007`` or ``007`` (RDED) is class 7, the
  position of the class in the training data's class list (sorted folder names for an ImageFolder data set,
  as torchvision numbers them). Files at the top and a top-level ``soft_labels`` folder are not classes.
- Classes, Parquet: integer labels; with Hugging Face ClassLabel names in the schema metadata, the names
  follow the folder rule above, without them a label is the class number.
- Images per class: a class's images in natural order of their paths (``id2`` before ``id10``), or in row
  order for Parquet, are its IPC indices 0, 1, ...; every class of the run needs at least one, none more than
  the declared IPC.
- Pixels: a JPEG or PNG of the run's resolution (square) in L or RGB is kept byte for byte (channels are
  converted when the set is read, as every set's are). Any other image is converted as the training data
  is (to the run's channels, shorter side to the resolution with antialiased bilinear, centre crop,
  `data.base.resize_center`) and stored as PNG.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from prism_ray.config import ImportedSetConfig, StorageConfig
from prism_ray.data.base import DataError, resize_center, to_channels
from prism_ray.data.image_folder import IMAGE_EXTENSIONS, decode_image
from prism_ray.data.index import resolve_uri
from prism_ray.data.parquet_table import class_names_from_metadata
from prism_ray.storage import filesystem, parquet_table, read_objects, sha256, table_bytes, translate_errors

SOFT_LABELS = "soft_labels"  # a prism-ray export's soft label tables: never classes or images
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png"}  # kept byte for byte at the run's size
NUMBERED = re.compile(r"(?:new|class)?(\d+)")
PREFIXED = re.compile(r"(\d+)_(.+)")
CHUNK = 256  # images read (concurrently on S3) and checked per step
INDEX_META = b"prism_ray_set_source"
RULE = 1  # version of the conversion rule above: part of an imported set's fingerprint


# ------------------------------------------------------------------------------------------ class names


def safe_folder_name(name: str) -> str:
    """A class name as a folder name: path separators become '_', and a leading '.' (hidden) too."""
    out = name.replace("/", "_").replace("\\", "_")
    return "_" + out[1:] if out.startswith(".") else out


def export_folder_names(class_names: list[str]) -> list[str]:
    """Folder per class id for an ImageFolder export: the class names, unless sorting them would not give the
    class order (torchvision's ImageFolder numbers classes in sorted folder order) or two collide; then each
    is prefixed with its zero-padded class number (``007_Sneaker``), so every reader numbers them alike."""
    plain = [safe_folder_name(n) for n in class_names]
    if len(set(plain)) == len(plain) and plain == sorted(plain) and all(plain):
        return plain
    width = max(3, len(str(len(class_names) - 1)))
    return [f"{i:0{width}d}_{n}" for i, n in enumerate(plain)]


def natural_key(text: str) -> tuple:
    """Sort key comparing digit runs as numbers: class003_id2 before class003_id10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def map_classes(names: list[str], class_names: list[str], what: str, where) -> tuple[dict[str, int], str]:
    """Each of `names` (class folders, or ClassLabel names) -> a class id of the run, by one rule for all:
    'names' (the class names, or number_name) or 'numbers' (new007, class007, 007). `where(name)` says
    where a name was found, for errors."""
    n = len(class_names)
    by_name: dict[str, int] = {}
    for i, c in enumerate(class_names):
        by_name.setdefault(c, i)
        by_name.setdefault(safe_folder_name(c), i)

    def named(f: str) -> int | None:
        if f in by_name:
            return by_name[f]
        m = PREFIXED.fullmatch(f)
        if m and int(m[1]) < n and m[2] == safe_folder_name(class_names[int(m[1])]):
            return int(m[1])
        return None

    def numbered(f: str) -> int | None:
        m = NUMBERED.fullmatch(f)
        return int(m[1]) if m else None

    mapping, rule = {f: named(f) for f in names}, "names"
    if any(v is None for v in mapping.values()):
        mapping, rule = {f: numbered(f) for f in names}, "numbers"
        unknown = [f for f in names if named(f) is None and numbered(f) is None]
        if unknown:
            example = safe_folder_name(class_names[0]) if class_names else ""
            raise DataError(f"{where(unknown[0])}: unknown class {what} {unknown[0]!r}: not a class of the training "
                            f"data (e.g. {example!r}) and not numbered (new000, class000, 000)")
        if any(v is None for v in mapping.values()):
            a = next(f for f in names if mapping[f] is None)
            b = next(f for f in names if mapping[f] is not None and named(f) is None)
            raise DataError(f"{where(a)}: class {what}s mix class names ({a!r}) and numbers ({b!r}); name every "
                            f"class one way")
        for f in names:
            if mapping[f] >= n:
                raise DataError(f"{where(f)}: class {what} {f!r} is class number {mapping[f]}, but the run's data has "
                                f"{n} classes (0..{n - 1}); numbers count the training data's classes in order")
    seen: dict[int, str] = {}
    for f in names:
        c = mapping[f]
        if c in seen:
            raise DataError(f"{where(f)}: class {what}s {seen[c]!r} and {f!r} are both class {c} "
                            f"({class_names[c]!r}); keep one")
        seen[c] = f
    return mapping, rule


# ------------------------------------------------------------------------------------------ the index


@dataclass
class SourceIndex:
    """An external set, listed and checked: a row per image in (class, ipc) order, and where it came from."""

    name: str
    spec: dict  # `source_spec`: what the listing depends on
    format: str  # image_folder / parquet
    rule: str  # names / numbers: how classes were told
    table: pa.Table  # class_id, ipc_index, path, row_group, offset, bytes, sha256, width, height, convert
    class_names: list[str]
    declared_ipc: int
    files: list[str] = field(default_factory=list)  # parquet: data files relative to the URI

    @property
    def uri(self) -> str:
        return self.spec["uri"]

    def rows(self) -> list[dict]:
        return self.table.to_pylist()

    def counts(self) -> list[int]:
        return np.bincount(self.table.column("class_id").to_numpy(), minlength=len(self.class_names)).tolist()

    def digest(self) -> str:
        """What the set holds: every image's class, IPC index and checksum."""
        cols = zip(*(self.table.column(c).to_pylist() for c in ("class_id", "ipc_index", "sha256")))
        return sha256("".join(f"{c},{k},{h}\n" for c, k, h in cols).encode())

    def summary(self) -> dict:
        counts = self.counts()
        sizes = Counter(zip(self.table.column("width").to_pylist(), self.table.column("height").to_pylist()))
        return {"set": self.name, "uri": self.uri, "format": self.format, "class_rule": self.rule,
                "images": self.table.num_rows, "classes": len(counts), "declared_ipc": self.declared_ipc,
                "ipc_min": min(counts), "ipc_max": max(counts), "ipc_per_class": counts,
                "converted": int(sum(self.table.column("convert").to_pylist())),
                "sizes": {f"{w}x{h}": k for (w, h), k in sizes.most_common()}, "digest": self.digest()}

    def describe(self, resolution: int, channels: int) -> str:
        """One line: what was found, IPC per class, what will be converted."""
        s = self.summary()
        ipc = f"IPC {s['ipc_min']}" if s["ipc_min"] == s["ipc_max"] else f"IPC {s['ipc_min']}-{s['ipc_max']}"
        short = [f"{c} ({k})" for c, k in enumerate(s["ipc_per_class"]) if k < self.declared_ipc]
        line = (f"imported set {self.name}: {s['images']:,} images from {self.uri} ({self.format}, classes by "
                f"{'name' if self.rule == 'names' else 'number'}), {s['classes']} classes, {ipc} per class "
                f"(declared {self.declared_ipc})")
        if short:
            line += f"; below it: class {', '.join(short[:8])}{' ...' if len(short) > 8 else ''}"
        if s["converted"]:
            seen = ", ".join(list(s["sizes"])[:3])
            line += (f"; {s['converted']:,} converted to {channels}x{resolution}x{resolution} PNG (sizes found: "
                     f"{seen})")
        return line

    def to_bytes(self) -> bytes:
        meta = {"name": self.name, "spec": self.spec, "format": self.format, "rule": self.rule,
                "class_names": self.class_names, "declared_ipc": self.declared_ipc, "files": self.files}
        return table_bytes(self.table.replace_schema_metadata({INDEX_META: json.dumps(meta).encode()}))

    @classmethod
    def from_bytes(cls, data: bytes) -> SourceIndex:
        table = parquet_table(data)
        meta = json.loads(table.schema.metadata[INDEX_META])
        return cls(meta["name"], meta["spec"], meta["format"], meta["rule"], table.replace_schema_metadata(None),
                   meta["class_names"], meta["declared_ipc"], meta["files"])


INDEX_SCHEMA = pa.schema([("class_id", pa.int32()), ("ipc_index", pa.int32()), ("path", pa.string()),
                          ("row_group", pa.int32()), ("offset", pa.int32()), ("bytes", pa.int64()),
                          ("sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                          ("convert", pa.bool_())])


def source_spec(spec: ImportedSetConfig, declared_ipc: int, class_names: list[str], channels: int,
                resolution: int) -> dict:
    """What an imported set's listing and conversion depend on (`method` is a description: not in it)."""
    return {"uri": resolve_uri(spec.uri), "format": spec.format, "declared_ipc": declared_ipc,
            "image_column": spec.image_column, "label_column": spec.label_column, "channels": channels,
            "resolution": resolution, "classes": sha256(json.dumps(class_names).encode()), "rule": RULE}


# ------------------------------------------------------------------------------------------ pixels


def needs_conversion(blob: bytes, name: str, resolution: int) -> tuple[bool, int, int]:
    """(convert, width, height) of an encoded image, decoding it whole (a broken file fails here, named)."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            im.load()  # every pixel: a truncated file fails here, not in a worker
            w, h = im.size
            keep = im.format in KEEP_FORMATS and im.mode in ("L", "RGB") and (w, h) == (resolution, resolution)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot decode image ({e}); replace or remove the file") from None
    return not keep, w, h


def prepare_image(blob: bytes, name: str, channels: int, resolution: int) -> tuple[bytes, str, bool]:
    """(bytes to commit, file extension, converted) by the rule in this module's docstring."""
    from prism_ray.algo.encode import encode_pixels

    convert, _, _ = needs_conversion(blob, name, resolution)
    if not convert:
        with Image.open(io.BytesIO(blob)) as im:
            return blob, KEEP_FORMATS[im.format], False
    x = to_channels(decode_image(blob, name), channels).float().div_(255.0)
    pixels = resize_center(x, resolution).clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
    return encode_pixels(pixels, "png"), "png", True


# ------------------------------------------------------------------------------------------ listing


def _visible(rel: str) -> bool:
    return not any(part.startswith(".") for part in rel.split("/"))


def _list_tree(uri: str, storage: StorageConfig | None, field_name: str):
    """(fs, base, files {rel: size}, top-level folders) of everything under `uri`, one recursive listing."""
    fs, base = filesystem(uri, storage)
    with translate_errors("cannot list", uri):
        if not fs.exists(base):
            raise DataError(f"{field_name}: {uri} not found")
        if not fs.isdir(base):
            return fs, base, None, []
        found = fs.find(base, withdirs=True, detail=True)
    files, folders = {}, set()
    for path, info in found.items():
        rel = posixpath.relpath(path, base)
        if rel == "." or not _visible(rel):
            continue
        if info.get("type") == "directory":
            if "/" not in rel:
                folders.add(rel)
        else:
            files[rel] = info.get("size")
            if "/" in rel:
                folders.add(rel.split("/", 1)[0])
    folders.discard(SOFT_LABELS)
    return fs, base, files, sorted(folders)


def index_source(name: str, spec: ImportedSetConfig, class_names: list[str], channels: int, resolution: int,
                 declared_ipc: int, storage: StorageConfig | None = None) -> SourceIndex:
    """List, map and check an external set; raises DataError naming the file or field on anything a run could not
    use (nothing is written). Every image is read and decoded once here."""
    field_name = f"baselines.imported.{name}"
    uri = resolve_uri(spec.uri)
    fs, base, files, folders = _list_tree(uri, storage, f"{field_name}.uri")
    fmt = spec.format
    if fmt == "auto":
        if files is None:
            fmt = "parquet" if base.endswith(".parquet") else "image_folder"
        else:
            images = any(r.lower().endswith(IMAGE_EXTENSIONS) and not r.startswith(f"{SOFT_LABELS}/") for r in files)
            tables = any(r.endswith(".parquet") and not r.startswith(f"{SOFT_LABELS}/") for r in files)
            fmt = "parquet" if tables and not images else "image_folder"
    spec_dict = source_spec(spec, declared_ipc, class_names, channels, resolution)
    args = (name, spec_dict, class_names, channels, resolution, declared_ipc, field_name)
    if fmt == "image_folder":
        if files is None:
            raise DataError(f"{field_name}.uri: {uri} is a file; an image_folder set is a folder of class folders")
        return _index_folder(fs, base, uri, files, folders, *args)
    return _index_parquet(fs, base, uri, files, spec, *args)


def _check_counts(counts: list[int], class_names: list[str], declared_ipc: int, field_name: str, place) -> None:
    """Every class has images, none more than declared; `place(c)` names where class c's images are."""
    for c, k in enumerate(counts):
        if k == 0:
            raise DataError(f"{place(c)}: class {c} ({class_names[c]!r}) has no images; an imported set needs every "
                            f"class of the run's data")
        if k > declared_ipc:
            raise DataError(f"{place(c)}: class {c} ({class_names[c]!r}) has {k} images, more than the declared IPC "
                            f"{declared_ipc} ({field_name}.ipc, else recover.ipc); declare its IPC or trim the set")


def _index_folder(fs, base, uri, files, folders, name, spec_dict, class_names, channels, resolution, declared_ipc,
                  field_name) -> SourceIndex:
    if not folders:
        raise DataError(f"{field_name}.uri: {uri} has no class folders (one folder of images per class)")
    mapping, rule = map_classes(folders, class_names, "folder", lambda f: f"{uri}/{f}")
    per_class: dict[int, list[tuple[str, int]]] = defaultdict(list)
    for rel, size in files.items():
        if "/" not in rel or not rel.lower().endswith(IMAGE_EXTENSIONS):
            continue  # files at the top (a card, classes.json) and non-images (notes) are not images
        top = rel.split("/", 1)[0]
        if top in mapping:
            per_class[mapping[top]].append((rel, size))
    for f in folders:
        if not per_class.get(mapping[f]):
            raise DataError(f"{uri}/{f}: class folder holds no images (.jpg, .png, ...); add its images or remove "
                            f"the folder")
    folder_of = {c: f for f, c in mapping.items()}
    counts = [len(per_class.get(c, ())) for c in range(len(class_names))]
    _check_counts(counts, class_names, declared_ipc, field_name,
                  lambda c: f"{uri}/{folder_of[c]}" if c in folder_of else
                  f"{uri} (no folder for it, e.g. {export_folder_names(class_names)[c]!r} or new{c:03d})")
    rows = []
    for c in range(len(class_names)):
        for k, (rel, _) in enumerate(sorted(per_class[c], key=lambda e: natural_key(e[0]))):
            rows.append({"class_id": c, "ipc_index": k, "path": rel, "row_group": -1, "offset": -1})
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        with translate_errors("cannot read", uri):
            blobs = read_objects(fs, [f"{base}/{r['path']}" for r in chunk])
        for r, blob in zip(chunk, blobs):
            where = f"{uri}/{r['path']}"
            if isinstance(blob, BaseException):
                raise DataError(f"{where}: cannot be read ({blob})")
            _check_image(r, blob, where, resolution)
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    return SourceIndex(name, spec_dict, "image_folder", rule, table, list(class_names), declared_ipc)


def _check_image(row: dict, blob: bytes, where: str, resolution: int) -> None:
    convert, w, h = needs_conversion(blob, where, resolution)
    row.update(bytes=len(blob), sha256=sha256(blob), width=w, height=h, convert=convert)


def _parquet_files(fs, base, uri, files, field_name) -> list[str]:
    if files is None:
        return [""]
    found = sorted((r for r in files if r.endswith(".parquet") and not r.startswith(f"{SOFT_LABELS}/")),
                   key=natural_key)
    if not found:
        raise DataError(f"{field_name}.uri: no .parquet files under {uri}")
    return found


def _file(base: str, rel: str) -> str:
    return f"{base}/{rel}" if rel else base


def _index_parquet(fs, base, uri, files, spec, name, spec_dict, class_names, channels, resolution, declared_ipc,
                   field_name) -> SourceIndex:
    rels = _parquet_files(fs, base, uri, files, field_name)
    image_col, label_col = spec.image_column, spec.label_column
    labels_per_file, names_per_file = [], []
    for rel in rels:
        where = _file(uri, rel)
        with translate_errors("cannot read", where):
            with fs.open(_file(base, rel), "rb") as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                for col, key in ((image_col, "image_column"), (label_col, "label_column")):
                    if col not in schema.names:
                        raise DataError(f"{where}: no column {col!r} ({field_name}.{key}); its columns are "
                                        f"{', '.join(schema.names)}")
                if not pa.types.is_integer(schema.field(label_col).type):
                    raise DataError(f"{where}: column {label_col!r} ({field_name}.label_column) holds "
                                    f"{schema.field(label_col).type}, not integer labels")
                groups = []
                for g in range(pf.num_row_groups):
                    col = pf.read_row_group(g, columns=[label_col], use_threads=False).column(0)
                    if col.null_count:
                        raise DataError(f"{where}: column {label_col!r} has empty labels in row group {g}")
                    groups.append(col.to_numpy().astype(np.int64))
        labels_per_file.append(groups)
        names_per_file.append(class_names_from_metadata(schema, label_col))
    label_names = names_per_file[0]
    if any(n != label_names for n in names_per_file):
        raise DataError(f"{field_name}.uri: the files under {uri} carry different ClassLabel names; give them one "
                        f"class list")
    used = sorted({int(v) for groups in labels_per_file for g in groups for v in np.unique(g)})
    if label_names is not None:
        bad = [v for v in used if not 0 <= v < len(label_names)]
        if bad:
            raise DataError(f"{uri}: label {bad[0]} is outside the {len(label_names)} ClassLabel names of its metadata")
        mapping, rule = map_classes([label_names[v] for v in used], class_names, "label",
                                    lambda f: f"{uri} ({label_col} {f!r})")
        to_class = {v: mapping[label_names[v]] for v in used}
    else:
        rule = "numbers"
        for v in used:
            if not 0 <= v < len(class_names):
                raise DataError(f"{uri}: label {v} in column {label_col!r} is not a class of the run's data "
                                f"(0..{len(class_names) - 1}); without ClassLabel names labels are class numbers")
        to_class = {v: v for v in used}
    counts = [0] * len(class_names)
    rows = []
    for fi, groups in enumerate(labels_per_file):  # IPC indices in file order, then row order
        for g, labels in enumerate(groups):
            for off, v in enumerate(labels.tolist()):
                c = to_class[v]
                rows.append({"class_id": c, "ipc_index": counts[c], "path": rels[fi], "row_group": g, "offset": off})
                counts[c] += 1
    _check_counts(counts, class_names, declared_ipc, field_name, lambda c: uri)
    by_group: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_group[r["path"]][r["row_group"]].append(r)
    for rel in rels:  # every image, one row group at a time
        groups = by_group[rel]
        for g, values in _row_group_images(fs, base, uri, rel, image_col, sorted(groups)):
            for r in groups[g]:
                where = f"{_file(uri, rel)} row group {g} row {r['offset']}"
                _check_image(r, _image_bytes(values[r["offset"]], where, image_col), where, resolution)
    rows.sort(key=lambda r: (r["class_id"], r["ipc_index"]))
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    return SourceIndex(name, spec_dict, "parquet", rule, table, list(class_names), declared_ipc, files=rels)


def _row_group_images(fs, base, uri, rel, image_col, groups):
    """(row group, its image column as Python values) for each of `groups` of one file."""
    with translate_errors("cannot read", _file(uri, rel)):
        with fs.open(_file(base, rel), "rb") as f:
            pf = pq.ParquetFile(f)
            for g in groups:
                yield g, pf.read_row_group(g, columns=[image_col], use_threads=False).column(0).to_pylist()


def _image_bytes(value, where: str, image_col: str) -> bytes:
    if isinstance(value, dict):  # {"bytes": ..., "path": ...}, as Hugging Face writes an Image feature
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise DataError(f"{where}: column {image_col!r} holds no image bytes (a Hugging Face image stored by path "
                        f"only cannot be imported: embed the bytes)")
    return bytes(value)


# ------------------------------------------------------------------------------------------ reading


def read_source(index: SourceIndex, rows: list[dict], image_column: str,
                storage: StorageConfig | None = None) -> list[bytes]:
    """The source bytes of `rows` (index rows), each checked against the checksum it had when it was indexed."""
    fs, base = filesystem(index.uri, storage)
    out: list[bytes | None] = [None] * len(rows)
    if index.format == "image_folder":
        with translate_errors("cannot read", index.uri):
            blobs = read_objects(fs, [f"{base}/{r['path']}" for r in rows])
        names = [f"{index.uri}/{r['path']}" for r in rows]
        for i, blob in enumerate(blobs):
            if isinstance(blob, BaseException):
                raise DataError(f"{names[i]}: cannot be read ({blob}); the set changed since it was indexed")
            out[i] = blob
    else:
        wanted: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            wanted[(r["path"], r["row_group"])].append(i)
        for rel in sorted({p for p, _ in wanted}, key=natural_key):
            groups = sorted(g for p, g in wanted if p == rel)
            for g, values in _row_group_images(fs, base, index.uri, rel, image_column, groups):
                for i in wanted[(rel, g)]:
                    where = f"{_file(index.uri, rel)} row group {g} row {rows[i]['offset']}"
                    out[i] = _image_bytes(values[rows[i]["offset"]], where, image_column)
        names = [f"{_file(index.uri, r['path'])} row group {r['row_group']} row {r['offset']}" for r in rows]
    for r, blob, where in zip(rows, out, names):
        if sha256(blob) != r["sha256"]:
            raise DataError(f"{where}: changed since the set was indexed (sha256 differs); rerun the recover stage "
                            f"with --fresh to index the set again")
    return out


__all__ = ["SourceIndex", "export_folder_names", "index_source", "map_classes", "natural_key", "prepare_image",
           "read_source", "safe_folder_name", "source_spec"]
