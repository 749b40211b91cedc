"""Data sets against real files: the Debian Fashion-MNIST, and ImageFolder / Parquet sets made here."""
from __future__ import annotations

import gzip
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from prism_ray.config import DataConfig, StorageConfig
from prism_ray.data import DataError, build_dataset
from prism_ray.data.fashion_mnist import parse_idx
from tests.conftest import FMNIST_ROOT


def test_fashion_mnist_real_files():
    train = build_dataset(DataConfig(), "train")
    val = build_dataset(DataConfig(), "val", class_names=train.class_names)
    assert (len(train), len(val), train.num_classes) == (60000, 10000, 10)
    assert train.counts() == [6000] * 10 and val.counts() == [1000] * 10
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    # "the k-th training image of class c" is the k-th of that class in file order
    with gzip.open(os.path.join(FMNIST_ROOT, "train-labels-idx1-ubyte.gz")) as f:
        labels = parse_idx(f.read(), "labels")
    with gzip.open(os.path.join(FMNIST_ROOT, "train-images-idx3-ubyte.gz")) as f:
        images = parse_idx(f.read(), "images")
    c, k = 7, 5
    src = np.flatnonzero(labels == c)[k]
    pixels = train.pixels_at([c], k)[0, 0]
    assert torch.equal((pixels * 255).round().to(torch.uint8), torch.from_numpy(images[src].copy()))
    x = train.image(c, k)
    assert x.shape == (1, 28, 28)
    assert torch.allclose(train.normalization.denormalize(x), pixels[None], atol=1e-6)


def test_fashion_mnist_normalized_statistics_and_shapes():
    ds = build_dataset(DataConfig(max_per_class=200), "train")
    x, y = ds.tensors()
    assert x.shape == (2000, 1, 28, 28) and y.bincount().tolist() == [200] * 10
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1.0) < 0.1
    rgb = build_dataset(DataConfig(channels=3, resolution=32, classes=4, max_per_class=5), "train")
    batch = rgb.images_at([0, 1, 2, 3], 4)
    assert batch.shape == (4, 3, 32, 32)
    assert torch.equal(batch[:, 0], batch[:, 1])  # grey repeated into RGB
    assert rgb.num_classes == 4 and len(rgb) == 20


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist") as info:
        build_dataset(DataConfig(root=str(tmp_path)), "train")
    assert "data.root" in str(info.value)


def test_fashion_mnist_from_s3(s3_endpoint, s3_bucket):
    import boto3
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        s3.upload_file(os.path.join(FMNIST_ROOT, name), s3_bucket, f"fmnist/{name}")
    val = build_dataset(DataConfig(root=f"s3://{s3_bucket}/fmnist"), "val", StorageConfig(endpoint_url=s3_endpoint))
    assert len(val) == 10000 and val.counts() == [1000] * 10


def _png(color, size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_image_folder(root, classes=("cat", "ant", "bee"), per_class=4):
    """Class folders in unsorted creation order, images of assorted sizes; colour encodes (class, k)."""
    for ci, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for k in range(per_class):
            (root / name / f"img_{k:02d}.png").write_bytes(_png((10 * ci, 20 * k, 99), size=(30 + 5 * k, 40)))


def test_image_folder_local(tmp_path):
    make_image_folder(tmp_path / "train")
    make_image_folder(tmp_path / "val", per_class=2)
    cfg = DataConfig(dataset="image_folder", train=str(tmp_path / "train"), val=str(tmp_path / "val"), channels=3,
                     resolution=32)
    train = build_dataset(cfg, "train")
    assert train.class_names == ["ant", "bee", "cat"]  # sorted, as ImageNet's layout
    assert train.counts() == [4, 4, 4]
    px = train.pixels_at([2], 3)[0]  # cat = created first (ci 0), image 3
    assert px.shape == (3, 32, 32)
    assert torch.allclose(px[:, 16, 16] * 255, torch.tensor([0.0, 60.0, 99.0]), atol=1.0)
    val = build_dataset(cfg, "val", class_names=train.class_names)
    assert val.counts() == [2, 2, 2]
    x, y = val.tensors()
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 2, 2]


def test_image_folder_on_s3(tmp_path, s3_endpoint, s3_bucket):
    import boto3
    make_image_folder(tmp_path / "train", per_class=2)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for dirpath, _, files in os.walk(tmp_path / "train"):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), tmp_path)
            s3.upload_file(os.path.join(dirpath, f), s3_bucket, f"imagenet/{rel}")
    cfg = DataConfig(dataset="image_folder", train=f"s3://{s3_bucket}/imagenet/train", channels=3, resolution=16)
    ds = build_dataset(cfg, "train", StorageConfig(endpoint_url=s3_endpoint))
    assert ds.class_names == ["ant", "bee", "cat"] and len(ds) == 6
    assert ds.images_at([0, 1, 2], 1).shape == (3, 3, 16, 16)


def test_image_folder_errors(tmp_path):
    make_image_folder(tmp_path / "train", per_class=2)
    (tmp_path / "train" / "ant" / "img_01.png").write_bytes(b"not an image")
    cfg = DataConfig(dataset="image_folder", train=str(tmp_path / "train"), channels=3, resolution=16)
    ds = build_dataset(cfg, "train")
    with pytest.raises(DataError, match="img_01.png: cannot decode"):
        ds.image(0, 1)
    with pytest.raises(DataError, match="has 2 images, image 5 was asked for"):
        ds.image(1, 5)
    with pytest.raises(DataError, match="not found"):
        build_dataset(DataConfig(dataset="image_folder", train=str(tmp_path / "nope")), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_dataset(DataConfig(dataset="image_folder", train=str(tmp_path / "empty")), "train")


def _parquet_table(n_classes=3, per_class=5, struct=False, names=None):
    images, labels = [], []
    for k in range(per_class):
        for c in range(n_classes):
            images.append(_png((40 * c, 10 * k, 0), size=(24, 24)))
            labels.append(c)
    col = pa.array([{"bytes": b, "path": None} for b in images]) if struct else pa.array(images, pa.binary())
    table = pa.table({"image": col, "label": pa.array(labels, pa.int64())})
    if names:
        hf = {"info": {"features": {"label": {"names": names, "_type": "ClassLabel"}}}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps(hf).encode()})
    return table


def test_parquet_table(tmp_path):
    pq.write_table(_parquet_table(), tmp_path / "train.parquet", row_group_size=4)
    cfg = DataConfig(dataset="parquet", train=str(tmp_path / "train.parquet"), channels=3, resolution=24)
    ds = build_dataset(cfg, "train")
    assert ds.num_classes == 3 and ds.counts() == [5, 5, 5]
    px = ds.pixels_at([2], 3)[0]  # class 2, its 4th row: colour (80, 30, 0)
    assert torch.allclose(px[:, 5, 5] * 255, torch.tensor([80.0, 30.0, 0.0]), atol=1.0)
    x, y = ds.tensors()
    assert x.shape == (15, 3, 24, 24) and y.bincount().tolist() == [5, 5, 5]


def test_parquet_folder_with_hf_struct_and_names(tmp_path):
    (tmp_path / "val").mkdir()
    t = _parquet_table(struct=True, names=["tench", "goldfish", "shark"])
    pq.write_table(t.slice(0, 6), tmp_path / "val" / "part-0.parquet")
    pq.write_table(t.slice(6), tmp_path / "val" / "part-1.parquet")
    ds = build_dataset(DataConfig(dataset="parquet", train=str(tmp_path / "val"), channels=1, resolution=8), "train")
    assert ds.class_names == ["tench", "goldfish", "shark"] and len(ds) == 15
    assert ds.image(1, 4).shape == (1, 8, 8)


def test_parquet_missing_column_names_the_field(tmp_path):
    pq.write_table(_parquet_table(), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="data.image_column"):
        build_dataset(DataConfig(dataset="parquet", train=str(tmp_path / "t.parquet"), image_column="jpg"), "train")
