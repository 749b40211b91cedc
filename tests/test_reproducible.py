"""Same config, same seed, two outputs: every committed file is byte-identical, squeeze checkpoints included, the
second run made by the workers the first left (as a sweep's points share theirs)."""
from __future__ import annotations

import pytest
from torch import nn

from prism_ray import pipeline
from prism_ray.algo.teachers import ModelShape, build_model
from prism_ray.storage import ShardStore, Storage
from tests.orchestration.helpers import pipeline_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

STAGE_PREFIXES = ("squeeze", "recover/prism", "recover/random_real", "relabel", "evaluate/students",
                  "evaluate/diversity")


def reduced_run(output: str):
    """All four stages; the teachers are trained here, one of them with dropout (MobileNetV2's classifier)."""
    return pipeline_config(output, teachers={"models": [
        {"name": "t1", "arch": "convnet", "weights": "squeeze"},
        {"name": "t2", "arch": "mobilenet_v2_x0_5", "weights": "squeeze"}]},
        squeeze={"epochs": 1, "batch_size": 16})


def committed_files(storage: Storage) -> dict[str, str]:
    """Every output a stage's combined manifest lists (stage and unit -> its bytes, checked against the manifest).
    Keys name the attempt that wrote them, so two runs are compared unit by unit, not key by key."""
    files = {}
    for prefix in STAGE_PREFIXES:
        store = ShardStore(storage, prefix)
        for row in store.read_combined().to_pylist():
            files[f"{prefix}/{row['path'].replace('.' + row['attempt'], '')}"] = store.read_output(row)
    return files


def test_same_seed_gives_the_same_bytes(tmp_path, kept_workers):
    assert any(isinstance(m, nn.Dropout) for m in build_model("mobilenet_v2_x0_5", ModelShape(4, 1, 28)).modules())
    storages = []
    for name in ("a", "b"):
        cfg = reduced_run(str(tmp_path / name))
        reports = pipeline.execute(cfg, list(cfg.run.stages), quiet=True, idle=kept_workers)
        assert reports and all(r.complete for r in reports)
        storages.append(pipeline.open_storage(cfg))
    a, b = (committed_files(s) for s in storages)
    assert a.keys() == b.keys()
    assert {"squeeze/teachers/t2.pt", "recover/prism/images/00000/00000_ipc0000.png"} <= a.keys()
    assert len([k for k in a if k.startswith("evaluate/students/weights/")]) == 4
    different = sorted(k for k in a if a[k] != b[k])
    assert different == []
    assert storages[0].read_bytes("report/results.parquet") == storages[1].read_bytes("report/results.parquet")
