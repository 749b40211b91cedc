"""The recover stage's teacher draw: once per shard, or once per IPC index for all its class groups (the
authors' data_synthesis.py draws the BN teachers once per ipc_id, then runs every class batch with them)."""
from __future__ import annotations

from collections import defaultdict

import pytest

from tests.orchestration.helpers import planned_stage, recover_config

POOL = {"teachers": {"models": [{"name": f"t{i}", "arch": "convnet", "weights": "random"} for i in range(1, 6)]}}


def draws(tmp_path, draw_per: str) -> dict[int, set[tuple[str, ...]]]:
    """IPC index -> the distinct BN-teacher lists its shards used (4 IPC indices x 3 class groups)."""
    cfg = recover_config(str(tmp_path / draw_per), ipc=4, classes=6, group=2, iterations=1,
                         recover={"primary": "t1", "bn_pool": ["t2", "t3", "t4", "t5"], "slots": 3,
                                  "slot_prob": 0.5, "draw_per": draw_per}, **POOL)
    stage, _ = planned_stage(cfg)
    worker = stage.open_worker()
    out: dict[int, set[tuple[str, ...]]] = defaultdict(set)
    for unit in stage.units():
        result, _ = worker.compute(unit)
        out[unit.payload["ipc_index"]].add(tuple(result.records[0].bn_teachers))
    return out


@pytest.mark.parametrize("draw_per", ["ipc", "shard"])
def test_teacher_draw_scope(tmp_path, draw_per):
    by_ipc = draws(tmp_path, draw_per)
    assert sorted(by_ipc) == [0, 1, 2, 3]
    if draw_per == "ipc":
        assert all(len(d) == 1 for d in by_ipc.values())  # every class group of an IPC index: one draw
        assert len({next(iter(d)) for d in by_ipc.values()}) > 1  # and the IPC indices draw anew
    else:
        assert any(len(d) > 1 for d in by_ipc.values())  # class groups draw on their own
