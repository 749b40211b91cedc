"""The rehearsal at CI size: ImageNet's class count on S3 (moto), every stage through the CLI, and after the
one listing by the driver no stage, worker, plan or status lists the data again."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from rehearsal import rehearse, table  # noqa: E402

pytestmark = pytest.mark.slow


def test_ci_shape_rehearsal(tmp_path):
    result = rehearse("ci", tmp_path, quiet=True)
    steps = {s["name"].split(" (")[0]: s for s in result["steps"]}
    assert list(steps) == ["index", "recover", "relabel", "evaluate", "plan", "status", "resume scan"]
    for name, s in steps.items():
        assert s["returncode"] == 0, (name, s["error"])
    assert steps["index"]["requests"]["data"]["LIST"] > 0  # the one listing
    for name in ("recover", "relabel", "evaluate", "plan", "status", "resume scan"):
        assert steps[name]["requests"]["data"]["LIST"] == 0, name
    reports = {r["stage"]: r for name in ("recover", "relabel", "evaluate") for r in steps[name]["reports"]}
    assert set(reports) == {"recover/prism", "relabel", "evaluate/diversity", "evaluate/students"}  # PRISM alone
    assert all(r["complete"] for r in reports.values())
    assert reports["recover/prism"]["total"] == 10  # IPC 1 x 10 groups of 100 classes
    assert reports["recover/prism"]["images"] == 1000
    assert all(r["worker_peak_rss"] > 0 for r in reports.values() if r["ran"])  # the workers' own figures
    assert steps["resume scan"]["reports"] and all(r["ran"] == 0 for r in steps["resume scan"]["reports"])
    assert "| recover |" in table(result)
