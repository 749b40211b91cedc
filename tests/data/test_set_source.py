"""Imported sets, listed and checked: SRe2L's folders, class names, Parquet with ClassLabel names, and bad input
named file by file."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from prism_ray.config import ImportedSetConfig
from prism_ray.data import DataError
from prism_ray.data.base import resize_center, to_channels
from prism_ray.data.image_folder import decode_image
from prism_ray.data.set_source import (export_folder_names, index_source, map_classes, natural_key,
                                       prepare_image, read_source)
from tests.support.distilled_sets import image_bytes, write_sre2l_tree

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress"]  # Fashion-MNIST's first four, in class order


def index(root, ipc=3, names=NAMES, channels=1, resolution=28, **spec):
    return index_source("ext", ImportedSetConfig(uri=str(root), **spec), names, channels, resolution, ipc)


def test_sre2l_folders_are_class_numbers_and_file_ids_the_ipc_order(tmp_path):
    root = write_sre2l_tree(tmp_path / "syn", classes=4, ipc=3)
    # SRe2L's id is zero-padded to 3 digits; an id past 999 must still sort after 999
    (root / "new001" / "class001_id002.jpg").rename(root / "new001" / "class001_id1000.jpg")
    idx = index(root)
    assert idx.format == "image_folder" and idx.rule == "numbers"
    rows = idx.rows()
    assert [(r["class_id"], r["ipc_index"]) for r in rows] == [(c, k) for c in range(4) for k in range(3)]
    assert [r["path"] for r in rows if r["class_id"] == 1] == [
        "new001/class001_id000.jpg", "new001/class001_id001.jpg", "new001/class001_id1000.jpg"]
    s = idx.summary()
    assert s["ipc_per_class"] == [3, 3, 3, 3] and s["converted"] == 12 and s["sizes"] == {"32x32": 12}
    line = idx.describe(28, 1)
    assert "12 images" in line and "IPC 3 per class" in line and "12 converted to 1x28x28" in line


def test_class_name_folders_and_the_export_naming(tmp_path):
    folders = export_folder_names(NAMES)  # these do not sort in class order: numbered prefixes
    assert folders == ["000_T-shirt_top", "001_Trouser", "002_Pullover", "003_Dress"]
    assert export_folder_names(["n01440764", "n01443537"]) == ["n01440764", "n01443537"]  # ImageNet's: as they are
    for c, folder in enumerate(folders):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.png").write_bytes(image_bytes(c, 28, "L", "PNG"))
    idx = index(tmp_path, ipc=1)
    assert idx.rule == "names" and [r["class_id"] for r in idx.rows()] == [0, 1, 2, 3]
    assert idx.summary()["converted"] == 0  # PNG, greyscale, the run's size: kept as they are
    # plain class names (a '/' written '_') work too, in any folder order
    assert map_classes(["Trouser", "T-shirt_top", "Dress", "Pullover"], NAMES, "folder", str)[0] == {
        "Trouser": 1, "T-shirt_top": 0, "Dress": 3, "Pullover": 2}
    assert map_classes(["00000", "00003", "00001", "00002"], NAMES, "folder", str) == (
        {"00000": 0, "00003": 3, "00001": 1, "00002": 2}, "numbers")  # RDED's numbered folders


def test_natural_order():
    assert sorted(["id10.jpg", "id2.jpg", "id1.jpg"], key=natural_key) == ["id1.jpg", "id2.jpg", "id10.jpg"]


def test_images_are_kept_byte_for_byte_or_converted_like_the_training_data():
    kept = image_bytes(3, 28, "L", "PNG")
    assert prepare_image(kept, "x", 1, 28) == (kept, "png", False)
    jpeg = image_bytes(4, 28, "RGB", "JPEG")
    assert prepare_image(jpeg, "x", 1, 28) == (jpeg, "jpg", False)  # channels are converted when sets are read
    big = image_bytes(5, 40, "RGB", "JPEG")
    data, ext, converted = prepare_image(big, "x", 1, 28)
    assert converted and ext == "png"
    expected = resize_center(to_channels(decode_image(big, "x"), 1).float() / 255.0, 28).clamp(0, 1)
    expected = (expected * 255).round().to(torch.uint8)
    got = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data))).copy())[None]
    assert got.shape == (1, 28, 28) and torch.equal(got, expected)
    bmp = io.BytesIO()
    Image.open(io.BytesIO(kept)).save(bmp, format="BMP")
    assert prepare_image(bmp.getvalue(), "x", 1, 28)[1:] == ("png", True)  # only JPEG and PNG are kept


def hf_table(names, labels, blobs, meta=True):
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
    if meta:
        schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": {
            "image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}}})})
    return pa.Table.from_pydict({"image": [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(blobs)],
                                 "label": labels}, schema=schema)


def test_parquet_with_classlabel_names_in_row_order(tmp_path):
    # labels name the classes in another order than the run's: mapped by name
    names = ["Dress", "Pullover", "Trouser", "T-shirt/top"]
    labels = [3, 2, 1, 0, 0, 1, 2, 3]
    blobs = [image_bytes(i, 28, "L", "PNG") for i in range(8)]
    (tmp_path / "d").mkdir()
    pq.write_table(hf_table(names, labels[:5], blobs[:5]), tmp_path / "d" / "part-1.parquet", row_group_size=2)
    pq.write_table(hf_table(names, labels[5:], blobs[5:]), tmp_path / "d" / "part-2.parquet", row_group_size=2)
    idx = index(tmp_path / "d", ipc=2)
    assert idx.format == "parquet" and idx.rule == "names"
    rows = idx.rows()
    # class of label v is NAMES.index(names[v]); IPC in file, then row order
    assert [(r["class_id"], r["ipc_index"], r["path"], r["row_group"], r["offset"]) for r in rows] == [
        (0, 0, "part-1.parquet", 0, 0), (0, 1, "part-2.parquet", 1, 0), (1, 0, "part-1.parquet", 0, 1),
        (1, 1, "part-2.parquet", 0, 1), (2, 0, "part-1.parquet", 1, 0), (2, 1, "part-2.parquet", 0, 0),
        (3, 0, "part-1.parquet", 1, 1), (3, 1, "part-1.parquet", 2, 0)]
    assert read_source(idx, rows[:3], "image") == [blobs[0], blobs[7], blobs[1]]
    # without ClassLabel names, labels are class numbers
    pq.write_table(hf_table([], [0, 1, 2, 3], blobs[:4], meta=False), tmp_path / "plain.parquet")
    idx = index(tmp_path / "plain.parquet", ipc=1)
    assert idx.rule == "numbers" and [r["class_id"] for r in idx.rows()] == [0, 1, 2, 3]


def test_a_source_changed_after_indexing_is_refused(tmp_path):
    root = write_sre2l_tree(tmp_path / "syn", classes=4, ipc=1)
    idx = index(root, ipc=1)
    (root / "new002" / "class002_id000.jpg").write_bytes(image_bytes(99))
    with pytest.raises(DataError, match=r"new002/class002_id000.jpg: changed since the set was indexed"):
        read_source(idx, idx.rows(), "image")


# ---- bad input: one line naming the file or folder


def bad(tmp_path, change, match, ipc=2, **spec):
    root = write_sre2l_tree(tmp_path / "syn", classes=4, ipc=2)
    change(root)
    with pytest.raises(DataError, match=match) as e:
        index(root, ipc=ipc, **spec)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unknown_class_folder(tmp_path):
    msg = bad(tmp_path, lambda r: (r / "new003").rename(r / "cats"), r"syn/cats: unknown class folder 'cats'")
    assert "new000, class000, 000" in msg


def test_empty_class_folder(tmp_path):
    def empty(r):
        for f in (r / "new002").iterdir():
            f.unlink()
        (r / "new002" / "notes.txt").write_text("not an image")
    bad(tmp_path, empty, r"syn/new002: class folder holds no images")


def test_missing_class(tmp_path):
    def drop(r):
        for f in (r / "new001").iterdir():
            f.unlink()
        (r / "new001").rmdir()
    bad(tmp_path, drop, r"no folder for it.*class 1 \('Trouser'\) has no images")


def test_undecodable_file(tmp_path):
    def corrupt(r):
        blob = (r / "new001" / "class001_id001.jpg").read_bytes()
        (r / "new001" / "class001_id001.jpg").write_bytes(blob[: len(blob) // 2])
    bad(tmp_path, corrupt, r"syn/new001/class001_id001.jpg: cannot decode image")


def test_larger_than_declared(tmp_path):
    bad(tmp_path, lambda r: (r / "new000" / "class000_id002.jpg").write_bytes(image_bytes(7)),
        r"syn/new000: class 0 \('T-shirt/top'\) has 3 images, more than the declared IPC 2")


def test_class_number_beyond_the_data(tmp_path):
    bad(tmp_path, lambda r: (r / "new003").rename(r / "new007"), r"new007: class folder 'new007' is class number 7, "
                                                                 r"but the run's data has 4 classes")


def test_names_and_numbers_mixed(tmp_path):
    bad(tmp_path, lambda r: (r / "new001").rename(r / "Trouser"), r"mix class names")


def test_two_folders_for_one_class(tmp_path):
    def dup(r):
        (r / "class003").mkdir()
        (r / "class003" / "x.jpg").write_bytes(image_bytes(5))
    bad(tmp_path, dup, r"'class003' and 'new003' are both class 3|'new003' and 'class003' are both class 3")


def test_parquet_without_its_columns(tmp_path):
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "t.parquet")
    with pytest.raises(DataError, match=r"t.parquet: no column 'image' \(baselines.imported.ext.image_column\)"):
        index(tmp_path / "t.parquet", ipc=1)
