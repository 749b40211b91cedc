"""Squeeze: teachers trained on real Fashion-MNIST images, checkpoints and accuracies in the run, resume."""
from __future__ import annotations

import json

import pytest
import torch

from prism_ray import pipeline
from prism_ray.algo.train import evaluate_classifier
from prism_ray.cli import main
from prism_ray.data import build_dataset
from prism_ray.orchestration.local import run_stage_local
from prism_ray.stages.base import ConfigMismatch
from prism_ray.stages.squeeze import SqueezeStage
from prism_ray.storage import sha256
from prism_ray.teacher_pool import load_pool, model_shape
from prism_ray.storage import ShardStore
from tests.conftest import small_config


def _stage(cfg):
    storage = pipeline.open_storage(cfg)
    return SqueezeStage(cfg, storage, pipeline.data_context(cfg)), storage


def test_squeeze_trains_records_and_resumes(tmp_path):
    cfg = small_config(str(tmp_path / "run"), squeeze={"epochs": 4, "batch_size": 64})
    stage, storage = _stage(cfg)
    stage.prepare()
    report = run_stage_local(stage, quiet=True)
    assert (report.ran, report.skipped, report.failed) == (2, 0, {})
    rows = {r["teacher"]: r for r in ShardStore(storage, "squeeze").read_combined().to_pylist()}
    assert set(rows) == {"convnet", "shufflenet"}
    assert rows["convnet"]["val_top1"] > 0.4  # 600 images, 4 epochs: well above chance (0.1)
    assert rows["convnet"]["train_images"] == 600
    store = ShardStore(storage, "squeeze")
    digests = {n: sha256(store.read_output(r)) for n, r in rows.items()}
    assert all(r["sha256"] == digests[n] for n, r in rows.items())

    # the checkpoints are the models that scored what the manifest says
    pool = load_pool(["convnet"], model_shape(cfg, 10), cfg, storage, torch.device("cpu"))
    val = build_dataset(cfg.data, "val")
    acc = evaluate_classifier(pool["convnet"], val.tensors(list(range(500))))
    assert acc["top1"] == pytest.approx(rows["convnet"]["val_top1"])

    # resume: nothing is trained again, nothing rewritten
    again = run_stage_local(_stage(cfg)[0], quiet=True)
    assert (again.ran, again.skipped) == (0, 2)
    assert {n: sha256(store.read_output(r)) for n, r in rows.items()} == digests

    # a teacher whose manifest is gone is trained again, alone
    storage.delete(store.manifest_key("shufflenet"))
    third = run_stage_local(_stage(cfg)[0], quiet=True)
    assert (third.ran, third.skipped) == (1, 1)


def test_changed_config_is_refused_naming_the_field(tmp_path):
    cfg = small_config(str(tmp_path / "run"), data={"max_per_class": 20}, squeeze={"epochs": 0.2})
    stage, _ = _stage(cfg)
    stage.prepare()
    run_stage_local(stage, quiet=True)
    changed = small_config(str(tmp_path / "run"), data={"max_per_class": 20}, squeeze={"epochs": 0.2, "lr": 0.2})
    with pytest.raises(ConfigMismatch, match="squeeze.lr"):
        _stage(changed)[0].prepare()
    stage2, storage = _stage(changed)
    old = stage2.store.generation
    stage2.prepare(fresh=True)  # explicit start over
    assert stage2.generation != old and stage2.store.committed() == set()
    assert not storage.list(f"squeeze/{old}")  # the old generation is gone


def test_squeeze_on_ray_via_cli(tmp_path, ray_local, capsys):
    out = str(tmp_path / "run")
    args = ["--set", f"run.output={out}", "--set", "data.max_per_class=30", "--set", "data.max_val=200",
            "--set", "squeeze.epochs=0.5", "--set",
            "teachers.models=[{name: a, arch: convnet}, {name: b, arch: convnet}, {name: c, arch: shufflenet_v2_x0_5}]",
            "--set", "recover.primary=a", "--quiet"]
    assert main(["squeeze", *args, "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert reports[0]["ran"] == 3 and reports[0]["complete"]
    assert main(["status", out, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    (sq,) = status["stages"]
    assert (sq["stage"], sq["planned"], sq["committed"], sq["missing"], sq["failed"]) == ("squeeze", 3, 3, 0, 0)
    assert main(["squeeze", *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["ran"] == 0
