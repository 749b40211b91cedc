"""The data index: each split listed once into Parquet; readers built from it list nothing and read the same images."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from prism_ray.cli import main
from prism_ray.config import DataConfig, StorageConfig
from prism_ray.data import DataError, build_dataset
from prism_ray.data.fashion_mnist import CLASS_NAMES
from prism_ray.data.index import DataIndex, build_indexes, data_source, read_index, write_indexes
from prism_ray.storage import ShardStore, Storage
from tests.conftest import FMNIST_ROOT
from tests.data.test_datasets import _parquet_table, make_image_folder


def _folder_config(tmp_path, **kw) -> DataConfig:
    return DataConfig(dataset="image_folder", train=str(tmp_path / "train"), val=str(tmp_path / "val"), channels=3,
                      resolution=16, **kw)


def test_image_folder_index_rows_metadata_and_readers(tmp_path):
    make_image_folder(tmp_path / "train", per_class=3)
    make_image_folder(tmp_path / "val", classes=("bee", "cat"), per_class=2)
    cfg = _folder_config(tmp_path)
    indexes = build_indexes(cfg)
    train, val = indexes["train"], indexes["val"]
    assert train.class_names == ["ant", "bee", "cat"] and len(train) == 9 and train.verified
    first = train.table.slice(0, 1).to_pylist()[0]
    assert first == {"path": "ant/img_00.png", "class_id": 0,
                     "bytes": os.path.getsize(tmp_path / "train" / "ant" / "img_00.png")}
    # val rows carry the training class ids; a class val lacks is simply absent
    assert val.class_names == train.class_names and val.counts() == [0, 2, 2]

    stored = DataIndex.from_bytes(train.to_bytes(), "train-index.parquet")
    assert stored.table.equals(train.table) and stored.class_names == train.class_names
    assert stored.source == data_source(cfg) and stored.source["train"] == str(tmp_path / "train")

    write_indexes(str(tmp_path / "index"), indexes)
    from_index = build_dataset(cfg, "train", index=str(tmp_path / "index"))
    listed = build_dataset(cfg, "train")
    assert torch.equal(from_index.tensors()[0], listed.tensors()[0])
    assert from_index.counts() == [3, 3, 3]
    val_ds = build_dataset(cfg, "val", index=str(tmp_path / "index"), capped=False)
    assert val_ds.counts() == [0, 2, 2] and val_ds.tensors()[1].tolist() == [1, 1, 2, 2]


def test_parquet_index_holds_locations_and_reads_the_right_rows(tmp_path):
    (tmp_path / "train").mkdir()
    table = _parquet_table(n_classes=3, per_class=5)  # rows ordered k-major: row r is class r % 3
    pq.write_table(table.slice(0, 9), tmp_path / "train" / "part-0.parquet", row_group_size=4)
    pq.write_table(table.slice(9), tmp_path / "train" / "part-1.parquet", row_group_size=4)
    cfg = DataConfig(dataset="parquet", train=str(tmp_path / "train"), channels=3, resolution=24)
    (index,) = build_indexes(cfg).values()
    assert index.files == ["part-0.parquet", "part-1.parquet"] and index.verified
    rows = index.table.to_pylist()
    assert [(r["file"], r["row_group"], r["offset"]) for r in rows[7:11]] == [(0, 1, 3), (0, 2, 0), (1, 0, 0), (1, 0, 1)]
    assert [r["class_id"] for r in rows] == [r % 3 for r in range(15)]
    ds = build_dataset(cfg, "train", index=index)
    px = ds.pixels_at([2], 3)[0]  # class 2's 4th row: colour (80, 30, 0)
    assert torch.allclose(px[:, 5, 5] * 255, torch.tensor([80.0, 30.0, 0.0]), atol=1.0)


def test_fashion_mnist_takes_the_same_path(tmp_path):
    indexes = build_indexes(DataConfig(root=FMNIST_ROOT))
    assert {s: len(i) for s, i in indexes.items()} == {"train": 60000, "val": 10000}
    assert indexes["train"].class_names == CLASS_NAMES and indexes["train"].counts() == [6000] * 10
    write_indexes(str(tmp_path / "index"), indexes)
    from_index = build_dataset(DataConfig(max_per_class=5), "train", index=str(tmp_path / "index"))
    listed = build_dataset(DataConfig(max_per_class=5), "train")
    assert torch.equal(from_index.tensors()[0], listed.tensors()[0])


def test_an_index_of_other_data_is_refused(tmp_path):
    make_image_folder(tmp_path / "train", per_class=2)
    make_image_folder(tmp_path / "other", per_class=2)
    write_indexes(str(tmp_path / "index"), build_indexes(DataConfig(dataset="image_folder", train=str(tmp_path / "train"))))
    moved = DataConfig(dataset="image_folder", train=str(tmp_path / "other"))
    with pytest.raises(DataError, match="data.train is .* in the index but .* in the config"):
        build_dataset(moved, "train", index=str(tmp_path / "index"))
    with pytest.raises(DataError, match="no data index .*val-index.parquet"):
        build_dataset(DataConfig(dataset="image_folder", train=str(tmp_path / "train"), val=str(tmp_path / "train")),
                      "val", index=str(tmp_path / "index"))


def test_readers_pickle_without_their_filesystem_and_read_in_dataloader_workers(tmp_path, s3_endpoint, s3_bucket):
    import boto3
    make_image_folder(tmp_path / "train", per_class=4)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for dirpath, _, files in os.walk(tmp_path / "train"):
        for f in files:
            s3.upload_file(os.path.join(dirpath, f), s3_bucket, os.path.relpath(os.path.join(dirpath, f), tmp_path))
    pq.write_table(_parquet_table(), tmp_path / "t.parquet", row_group_size=4)
    storage = StorageConfig(endpoint_url=s3_endpoint)
    sets = [build_dataset(DataConfig(dataset="image_folder", train=f"s3://{s3_bucket}/train", channels=3,
                                     resolution=16), "train", storage),
            build_dataset(DataConfig(dataset="parquet", train=str(tmp_path / "t.parquet"), channels=3, resolution=16),
                          "train")]
    for ds in sets:
        expected = ds.tensors()  # opens the filesystem (and Parquet handles) in this process
        state = ds.__getstate__()
        assert state["_fs"] is None and not state.get("_handles")
        assert torch.equal(pickle.loads(pickle.dumps(ds)).tensors()[0], expected[0])
        # forked DataLoader workers inherit an opened filesystem: each must open its own
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
        xs, ys = zip(*loader)
        assert torch.equal(torch.cat(xs), expected[0]) and torch.equal(torch.cat(ys), expected[1])


def _write_config(path, output, data: dict) -> str:
    raw = {"run": {"name": "idx", "output": str(output), "seed": 0, "stages": ["recover"]},
           "data": {"channels": 3, "resolution": 16, **data},
           "teachers": {"models": [{"name": "t1", "arch": "convnet", "weights": "random"}]},
           "recover": {"primary": "t1", "ipc": 1, "class_group": 4, "iterations": 2, "schedule": "flat", "jitter": 1,
                       "image_format": "png"},
           "baselines": {"random_real": True}}
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_run_lists_once_resumes_from_its_index_and_relists_when_pointed_at_other_data(tmp_path, capsys):
    make_image_folder(tmp_path / "a", per_class=2)
    make_image_folder(tmp_path / "b", classes=("dog", "eel"), per_class=3)
    out = tmp_path / "run"
    cfg = _write_config(tmp_path / "c.yaml", out, {"dataset": "image_folder", "train": str(tmp_path / "a")})
    assert main(["recover", cfg, "--local", "--quiet"]) == 0
    index = read_index(str(out / "data"), "train")
    assert index.source["train"] == str(tmp_path / "a") and len(index) == 6
    record = Storage(str(out)).read_json("run.json")["context"]
    assert record["index_uri"] == str(out / "data") and record["train_counts"] == [2, 2, 2]

    # resumed: the run's index is read, not the folder (an image added since is not seen)
    make_image_folder(tmp_path / "a", classes=("ant",), per_class=3)
    assert main(["recover", cfg, "--local", "--quiet", "--fresh"]) == 0
    assert len(read_index(str(out / "data"), "train")) == 6

    # pointed at other data: the recorded source differs, so the data is listed again, never the old index used
    moved = _write_config(tmp_path / "m.yaml", out, {"dataset": "image_folder", "train": str(tmp_path / "b")})
    capsys.readouterr()
    assert main(["recover", moved, "--local", "--quiet"]) == 2  # committed outputs of other data: refused
    assert "data.train" in capsys.readouterr().err
    assert main(["recover", moved, "--local", "--quiet", "--fresh"]) == 0
    index = read_index(str(out / "data"), "train")
    assert index.class_names == ["dog", "eel"] and len(index) == 6
    real = ShardStore(Storage(str(out)), "recover/random_real").read_combined()
    assert sorted(real.column("class_id").to_pylist()) == [0, 1]


def test_a_shared_index_is_used_as_is_and_checked_against_the_config(tmp_path, capsys):
    make_image_folder(tmp_path / "a", per_class=2)
    make_image_folder(tmp_path / "b", per_class=2)
    cfg = _write_config(tmp_path / "c.yaml", tmp_path / "run", {"dataset": "image_folder", "train": str(tmp_path / "a")})
    shared = tmp_path / "shared"
    assert main(["index", cfg, "--out", str(shared)]) == 0
    assert "train: 6 images, 3 classes, every image decoded" in capsys.readouterr().out
    assert main(["recover", cfg, "--local", "--quiet", "--set", f"data.index={shared}"]) == 0
    assert not (tmp_path / "run" / "data").exists()  # nothing listed, nothing copied
    assert Storage(str(tmp_path / "run")).read_json("run.json")["context"]["index_uri"] == str(shared)

    capsys.readouterr()
    args = ["recover", cfg, "--local", "--quiet", "--set", f"data.index={shared}", "--set", f"data.train={tmp_path / 'b'}",
            "--set", f"run.output={tmp_path / 'run2'}"]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "data.index" in line and "data.train" in line and "prism-ray index" in line
    assert not (tmp_path / "run2").exists()


def test_class_counts_come_from_the_index_with_caps(tmp_path):
    from prism_ray.config_loader import config_from_dict
    from prism_ray.runs import data_context
    make_image_folder(tmp_path / "train", classes=("a", "b", "c", "d"), per_class=3)
    cfg = config_from_dict({"run": {"output": str(tmp_path / "run")},
                            "data": {"dataset": "image_folder", "train": str(tmp_path / "train"), "channels": 3,
                                     "classes": 3, "max_per_class": 2}})
    ctx = data_context(cfg, write=False)
    assert (ctx.num_classes, ctx.class_names, ctx.train_counts, ctx.index_uri) == (3, ["a", "b", "c"], [2, 2, 2], None)
    assert not (tmp_path / "run").exists()  # plan's view: nothing written
    np.testing.assert_array_equal(build_dataset(cfg.data, "train").labels, [0, 0, 1, 1, 2, 2])
