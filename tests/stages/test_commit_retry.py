"""A commit that storage refuses for a while is retried with backoff, keeping the computed shard."""
from __future__ import annotations

import pytest

from prism_ray import storage as storage_module
from prism_ray.orchestration.local import run_stage_local
from prism_ray.stages.recover import RecoverWorker
from prism_ray.status import run_status
from prism_ray.storage import Backoff, Storage, TransientStorageError
from tests.orchestration.helpers import planned_stage, recover_config


@pytest.fixture
def counted_computes(monkeypatch):
    calls: list[str] = []
    real = RecoverWorker.compute

    def compute(self, unit):
        calls.append(unit.id)
        return real(self, unit)

    monkeypatch.setattr(RecoverWorker, "compute", compute)
    return calls


def flaky_writes(monkeypatch, needle: str, failures: int) -> list[str]:
    """Every Storage in this process fails its first `failures` writes of keys containing `needle` (SlowDown)."""
    failed: list[str] = []
    for method in ("write_bytes", "create_exclusive"):
        real = getattr(Storage, method)

        def write(self, key, data, _real=real):
            if needle in key and len(failed) < failures:
                failed.append(key)
                raise TransientStorageError(f"cannot write {key}: the storage service asks to retry (SlowDown)")
            return _real(self, key, data)

        monkeypatch.setattr(Storage, method, write)
    return failed


def test_commit_fails_twice_then_commits_without_a_second_compute(tmp_path, monkeypatch, counted_computes):
    monkeypatch.setattr(storage_module, "Backoff", lambda: Backoff(tries=4, first_delay=0.01))
    cfg = recover_config(str(tmp_path / "run"), ipc=2, classes=2, group=2, iterations=3)
    stage, storage = planned_stage(cfg)
    failed = flaky_writes(monkeypatch, "manifests/ipc0001", 2)  # the second shard's manifest, twice
    report = run_stage_local(stage, max_attempts=1, quiet=True)
    assert report.complete and report.failed == {} and report.attempts == 2
    assert len(failed) == 2 and report.storage_retries == 2  # the stage's report counts them too
    assert sorted(counted_computes) == ["ipc0000-cls0000-0001", "ipc0001-cls0000-0001"]  # each computed once
    rows = stage.store.read("ipc0001-cls0000-0001").to_pylist()
    assert {r["storage_retries"] for r in rows} == {2}
    assert {r["storage_retries"] for r in stage.store.read("ipc0000-cls0000-0001").to_pylist()} == {0}
    assert all(stage.store.verify(s) == [] for s in stage.store.committed())


def test_storage_failures_are_kept_apart_from_compute_failures(tmp_path, monkeypatch, counted_computes):
    monkeypatch.setattr(storage_module, "Backoff", lambda: Backoff(tries=2, first_delay=0.01))
    cfg = recover_config(str(tmp_path / "run"), ipc=2, classes=2, group=2, iterations=3)
    stage, storage = planned_stage(cfg)
    flaky_writes(monkeypatch, "images/00001/00001_ipc0001", 100)  # one image of the second shard, always
    report = run_stage_local(stage, max_attempts=2, quiet=True)
    assert list(report.failed) == ["ipc0001-cls0000-0001"]
    assert "storage kept failing after 2 tries" in report.failed["ipc0001-cls0000-0001"]
    # a commit that gave up counts as a failed attempt: the attempt after it computes again
    assert counted_computes.count("ipc0001-cls0000-0001") == 2
    (st,) = run_status(storage)["stages"]
    assert (st["committed"], st["failed"], st["failed_storage"]) == (1, 1, 1)
    assert st["failures"]["ipc0001-cls0000-0001"]["kind"] == "storage"
