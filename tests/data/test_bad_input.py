"""Bad data as a user meets it, through the CLI: exit 2, one line naming the file or field, nothing written.

CMYK JPEGs and 16-bit PNGs are not bad input: they must decode to the right 8-bit values.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from prism_ray.cli import main
from prism_ray.storage import ShardStore, Storage
from tests.data.test_datasets import _parquet_table, make_image_folder


def _config(tmp_path, data: dict) -> str:
    raw = {"run": {"name": "bad", "output": str(tmp_path / "out"), "seed": 0},
           "data": {"channels": 3, "resolution": 16, **data},
           "teachers": {"models": [{"name": "t1", "arch": "convnet", "weights": "random"}]},
           "recover": {"primary": "t1", "ipc": 1, "class_group": 4, "iterations": 2, "schedule": "flat", "jitter": 1,
                       "image_format": "png"},
           "baselines": {"random_real": True}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _refused(tmp_path, capsys, data: dict, *expected: str) -> None:
    """`prism-ray run` exits 2 with one line holding every `expected` text, before writing anything."""
    assert main(["run", _config(tmp_path, data), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("prism-ray: error: ")
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not (tmp_path / "out").exists()


def _jpeg(color, size=(20, 20), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).convert(mode).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _jpeg_folder(root, classes=("ant", "bee", "cat"), per_class=2):
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            (root / name / f"{k}.jpg").write_bytes(_jpeg((60 * ci, 30 * k, 90)))


def test_truncated_jpeg_is_named_before_the_run_starts(tmp_path, capsys):
    _jpeg_folder(tmp_path / "train")
    bad = tmp_path / "train" / "bee" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    _refused(tmp_path, capsys, {"dataset": "image_folder", "train": str(tmp_path / "train")},
             "data.train", str(bad), "truncated", "replace or remove the file")
    assert main(["plan", str(tmp_path / "config.yaml")]) == 0  # plan lists but decodes nothing, writes nothing
    assert not (tmp_path / "out").exists()


def test_an_unverified_truncated_jpeg_fails_the_unit_that_reads_it_naming_the_file(tmp_path, capsys):
    _jpeg_folder(tmp_path / "train")
    bad = tmp_path / "train" / "bee" / "0.jpg"  # the image random_real and recover start from for class 1
    bad.write_bytes(bad.read_bytes()[:200])
    cfg = _config(tmp_path, {"dataset": "image_folder", "train": str(tmp_path / "train"), "verify": False})
    assert main(["recover", cfg, "--local", "--quiet"]) == 1
    assert f"{bad}: cannot decode image" in capsys.readouterr().err


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG (greyscale for HxW, RGB for HxWx3), written by hand: PIL cannot write 16-bit RGB."""
    h, w = arr.shape[:2]
    colour = 0 if arr.ndim == 2 else 2
    rows = arr.reshape(h, -1).astype(">u2")
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_cmyk_jpeg_and_16_bit_png_simply_work(tmp_path):
    train = tmp_path / "train"
    for name in ("cmyk", "grey16", "rgb16"):
        (train / name).mkdir(parents=True)
    (train / "cmyk" / "0.jpg").write_bytes(_jpeg((200, 30, 90), size=(16, 16), mode="CMYK"))
    grey = (np.arange(256, dtype=np.uint16).reshape(16, 16)) * 257  # every 8-bit value v stored as v * 257
    (train / "grey16" / "0.png").write_bytes(_png16(grey))
    rgb = np.zeros((16, 16, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 40000, 300
    (train / "rgb16" / "0.png").write_bytes(_png16(rgb))
    assert Image.open(train / "grey16" / "0.png").mode == "I;16"  # the mode convert("L") clips at 255

    assert main(["recover", _config(tmp_path, {"dataset": "image_folder", "train": str(train)}), "--local",
                 "--quiet"]) == 0
    # the random real set holds each class's only image, 16 px, stored as PNG: the decoded pixels themselves
    out = Storage(str(tmp_path / "out"))

    store = ShardStore(out, "recover/random_real")
    rows = {r["class_id"]: r for r in store.read_combined().to_pylist()}

    def stored(class_id: int) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(store.read_output(rows[class_id]))).convert("RGB"))

    cmyk, grey8, rgb8 = stored(0), stored(1), stored(2)
    assert np.abs(cmyk.astype(int) - [200, 30, 90]).max() <= 3  # JPEG rounding only
    np.testing.assert_array_equal(grey8[..., 0], np.arange(256).reshape(16, 16))  # scaled by 257, not clipped
    assert (grey8[..., 0] == grey8[..., 2]).all()
    np.testing.assert_array_equal(rgb8[0, 0], [255, 156, 1])  # 65535, 40000, 300 / 257, rounded


def test_empty_class_folder(tmp_path, capsys):
    _jpeg_folder(tmp_path / "train")
    (tmp_path / "train" / "bat").mkdir()
    _refused(tmp_path, capsys, {"dataset": "image_folder", "train": str(tmp_path / "train")},
             "data.train", f"{tmp_path / 'train' / 'bat'} holds no images", "remove the folder")


def test_validation_class_the_training_set_lacks(tmp_path, capsys):
    _jpeg_folder(tmp_path / "train")
    _jpeg_folder(tmp_path / "val", classes=("ant", "yak"), per_class=1)
    _refused(tmp_path, capsys, {"dataset": "image_folder", "train": str(tmp_path / "train"),
                                "val": str(tmp_path / "val")},
             "data.val", f"{tmp_path / 'val' / 'yak'} is not a class of the training set")


@pytest.mark.parametrize("column, field", [("image_column", "data.image_column"), ("label_column", "data.label_column")])
def test_parquet_without_the_configured_column(tmp_path, capsys, column, field):
    (tmp_path / "train").mkdir()
    pq.write_table(_parquet_table(), tmp_path / "train" / "part-0.parquet")
    _refused(tmp_path, capsys, {"dataset": "parquet", "train": str(tmp_path / "train"), column: "jpg"},
             field, str(tmp_path / "train" / "part-0.parquet"), "'jpg'", "its columns are image, label")


def test_image_folder_that_is_not_there(tmp_path, capsys):
    make_image_folder(tmp_path / "train", per_class=1)
    _refused(tmp_path, capsys, {"dataset": "image_folder", "train": str(tmp_path / "tarin")},
             "data.train", f"{tmp_path / 'tarin'} not found")
