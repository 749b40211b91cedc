"""Recover on a local Ray instance: every shard once, manifests and status agree, resume, refusal, failures."""
from __future__ import annotations

import json

import pytest

from prism_ray import pipeline
from prism_ray.cli import main
from prism_ray.status import run_status
from prism_ray.storage import ShardStore
from tests.data.test_datasets import make_image_folder
from tests.orchestration.helpers import check_exactly_once, recover_config

pytestmark = pytest.mark.usefixtures("ray_local")


def test_two_workers_commit_every_shard_once(tmp_path):
    cfg = recover_config(str(tmp_path / "run"))
    (report,) = pipeline.execute(cfg, ["recover"], quiet=True)
    assert (report.total, report.ran, report.skipped, report.duplicates, report.failed) == (12, 12, 0, 0, {})
    storage = pipeline.open_storage(cfg)
    check_exactly_once(storage, "prism", 12, 24)
    rows = ShardStore(storage, "recover/prism").read_combined().to_pylist()
    assert {(r["class_id"], r["ipc_index"]) for r in rows} == {(c, k) for c in range(4) for k in range(6)}
    assert all(r["primary_teacher"] == "t1" and r["iterations"] == 10 for r in rows)
    (st,) = run_status(storage)["stages"]
    assert (st["planned"], st["committed"], st["missing"], st["failed"]) == (12, 12, 0, 0)
    assert (st["images_planned"], st["images_committed"]) == (24, 24)

    (again,) = pipeline.execute(cfg, ["recover"], quiet=True)  # resume: nothing left to do
    assert (again.ran, again.skipped) == (0, 12)


def test_changed_field_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = recover_config(out, ipc=1)
    pipeline.execute(cfg, ["recover"], quiet=True)
    cfg_path = tmp_path / "c.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["recover", str(cfg_path), "--set", "recover.lr=0.2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "recover.lr" in err and "--fresh" in err
    assert main(["recover", str(cfg_path), "--set", "recover.lr=0.2", "--quiet", "--fresh"]) == 0


def test_failing_shard_is_reported_and_redone_after_the_fix(tmp_path, capsys):
    data = tmp_path / "data"
    make_image_folder(data / "train", classes=("a", "b", "c", "d"), per_class=3)
    bad = data / "train" / "c" / "img_01.png"
    good = bad.read_bytes()
    bad.write_bytes(b"this is not a png")  # shard ipc 1 of classes c, d fails every time
    cfg = recover_config(str(tmp_path / "run"), ipc=3, classes=4, group=2,
                         data={"dataset": "image_folder", "train": str(data / "train"), "channels": 3,
                               "resolution": 16, "max_per_class": None, "verify": False})  # met by a worker
    import yaml
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["recover", str(cfg_path), "--quiet", "--json"]) == 1
    captured = capsys.readouterr()
    (report,) = json.loads(captured.out)
    assert report["ran"] == 5 and list(report["failed"]) == ["ipc0001-cls0002-0003"]
    assert "ipc0001-cls0002-0003" in captured.err and "img_01.png" in captured.err
    assert "rerun the same command" in captured.err
    status = run_status(pipeline.open_storage(cfg))["stages"][0]
    assert (status["committed"], status["failed"], status["missing"]) == (5, 1, 1)
    assert "cannot decode" in status["failures"]["ipc0001-cls0002-0003"]["error"]
    assert status["failures"]["ipc0001-cls0002-0003"]["attempts"] == 2  # ray.max_attempts

    bad.write_bytes(good)  # the cause removed
    assert main(["recover", str(cfg_path), "--quiet", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert (report["ran"], report["skipped"], report["failed"]) == (1, 5, {})
    status = run_status(pipeline.open_storage(cfg))["stages"][0]
    assert (status["committed"], status["failed"]) == (6, 0)


def test_recover_on_s3(s3_endpoint, s3_bucket):
    cfg = recover_config(f"s3://{s3_bucket}/runs/a", ipc=3, storage={"endpoint_url": s3_endpoint})
    (report,) = pipeline.execute(cfg, ["recover"], quiet=True)
    assert (report.ran, report.failed) == (6, {})
    storage = pipeline.open_storage(cfg)
    check_exactly_once(storage, "prism", 6, 12)
    # a shard whose images exist but whose manifest does not is redone; the others are skipped
    store = ShardStore(storage, "recover/prism")
    storage.delete(store.manifest_key("ipc0002-cls0000-0001"))
    storage.delete(store.combined_key)
    (again,) = pipeline.execute(cfg, ["recover"], quiet=True)
    assert (again.ran, again.skipped) == (1, 5)
    check_exactly_once(storage, "prism", 6, 12)
    (st,) = run_status(storage)["stages"]
    assert (st["planned"], st["committed"], st["missing"]) == (6, 6, 0)
