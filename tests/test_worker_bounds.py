"""The host memory `prism-ray plan` states for each worker kind is a bound real workers stay under: recover,
relabel, the student and diversity run on a local Ray (bench/worker_bounds.py) on an ImageNet-shaped image
folder of 40 classes at 112 px, batches of 40 classes, ShuffleNetV2 x0.5 and MobileNetV3-small teachers, CPU
workers; each worker's peak RSS (its own VmHWM) is compared with the bound. The bound must also stay useful:
under twice what the worker took."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

pytestmark = pytest.mark.slow


def test_workers_stay_under_the_planned_host_memory(tmp_path):
    from worker_bounds import measure

    result = measure(tmp_path, classes=40, res=112, group=40, val_batch=100, cpus=2)
    kinds = result["kinds"]
    assert set(kinds) == {"recover", "relabel", "student", "diversity"}
    for kind, f in kinds.items():
        assert f["peak"] <= f["bound"], f"{kind}: a worker took {f['peak'] / 1e9:.2f} GB, the plan says at most " \
                                         f"{f['bound'] / 1e9:.2f} GB"
        assert f["bound"] < 2 * f["peak"], f"{kind}: the bound {f['bound'] / 1e9:.2f} GB is no longer useful " \
                                           f"(the worker took {f['peak'] / 1e9:.2f} GB)"
