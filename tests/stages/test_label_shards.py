"""A label shard's file: written epoch by epoch in bounded row groups, read back one epoch at a time."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prism_ray.algo.soft_labels import plan_epoch
from prism_ray.stages import relabel
from prism_ray.stages.relabel import plan_table, read_epoch, read_epoch_rows, write_label_shard


def test_epochs_in_bounded_row_groups_read_back_exactly(monkeypatch):
    monkeypatch.setattr(relabel, "LABEL_ROW_GROUP_BYTES", 4096)  # ~70 rows of 10 fp16 logits and the plan
    want = {}

    def tables():
        for epoch in (4, 5):
            plan = plan_epoch(300, epoch, 0, mix_group=10, source_size=(28, 28), crop_scale=(0.25, 1), cutmix=True)
            values = torch.randn(300, 10, generator=torch.Generator().manual_seed(epoch)).to(torch.float16)
            want[epoch] = (plan, values)
            yield plan_table(plan, values, None)

    blob, rows = write_label_shard(tables())
    assert rows == 600
    meta = pq.ParquetFile(pa.BufferReader(blob)).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert meta.num_row_groups >= 8 and max(sizes) < 100 and sum(sizes) == 600  # no group holds an epoch
    for epoch, (plan, values) in want.items():
        table = read_epoch_rows(blob, epoch)
        assert table.num_rows == 300 and set(table.column("epoch").to_pylist()) == {epoch}  # its row groups only
        got_plan, got_values, indices = read_epoch(table, epoch, 10)
        assert indices is None and torch.equal(got_values, values)
        for field in ("order", "crops", "flips", "partner", "mix_box", "mix_lam"):
            assert torch.equal(getattr(got_plan, field), getattr(plan, field).to(getattr(got_plan, field).dtype))
