"""Relabel: FKD-style soft labels for every epoch of student training, stored as a few Parquet shards.

One unit = one set x a range of epochs (relabel.epochs_per_shard). Its output is one Parquet file with a
row per (epoch, position): the image index, the RandomResizedCrop box, the flip, the CutMix partner, box
and ratio, and the teachers' logits in fp16 (or the top-k values and indices). The reference writes one
file per batch per epoch (~300,000 files, ~30 GB at ImageNet IPC50); this is epochs / epochs_per_shard
files per set. In live mode nothing is stored: evaluate runs the same label code inside training.
"""
from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from prism_ray.algo.seeding import derive_seed
from prism_ray.algo.soft_labels import EpochPlan, dense_labels, plan_epoch, soft_labels
from prism_ray.config import Config
from prism_ray.data import dataset_normalization
from prism_ray.formatting import human_bytes
from prism_ray.memory import label_row_bytes, peak_rss_bytes
from prism_ray.stages.base import RunContext, Stage, StageError, Unit, Worker, read_upstream
from prism_ray.stages.image_sets import ImageSetCache, loader_workers, set_inputs, sets_fingerprint
from prism_ray.storage import Storage
from prism_ray.teacher_pool import best_device, load_pool, model_shape, squeeze_upstream

RELABEL_PREFIX = "relabel"


def label_seed(cfg: Config, set_name: str) -> int:
    """The seed of a set's label plans: the same in stored and live mode."""
    return derive_seed(cfg.run.seed, "labels", set_name)


def label_shards(cfg: Config, set_name: str) -> list[Unit]:
    epochs, per = cfg.relabel_epochs(), cfg.relabel.epochs_per_shard
    return [Unit(f"{set_name}-e{e0:04d}-{min(e0 + per, epochs) - 1:04d}",
                 {"set": set_name, "epochs": [e0, min(e0 + per, epochs)]}) for e0 in range(0, epochs, per)]


def shard_for_epoch(cfg: Config, set_name: str, epoch: int) -> Unit:
    return label_shards(cfg, set_name)[epoch // cfg.relabel.epochs_per_shard]


def labels_path(unit: Unit) -> str:
    return f"labels/{unit.id}.parquet"


def relabel_figures(cfg: Config, num_classes: int) -> dict:
    """Files and bytes of stored labels per set (fp16 logits, before compression) and the teachers' image
    forwards per set, for `plan`. Live labels are recomputed by every student training of the set."""
    n_images = num_classes * cfg.recover.ipc
    epochs = cfg.relabel_epochs()
    per_row = label_row_bytes(cfg, num_classes)
    files = -(-epochs // cfg.relabel.epochs_per_shard)
    size = n_images * epochs * per_row
    teachers = cfg.relabel_teachers()
    runs = len(cfg.evaluate.students) * len(cfg.evaluate.seeds) if cfg.relabel.mode == "live" else 1
    forwards = len(teachers) * epochs * n_images * runs
    ensemble = f"{cfg.relabel.ensemble} ensemble of " if len(teachers) > 1 else ""
    teacher_text = (f"{ensemble}{len(teachers)} teacher(s) ({', '.join(teachers)}) x {epochs} epochs x "
                    f"{n_images:,} images{f' x {runs} student trainings' if runs > 1 else ''} = "
                    f"{forwards:,} teacher image forwards")
    if cfg.relabel.mode == "live":
        return {"files": 0, "bytes": 0, "teachers": teachers, "teacher_forwards": forwards,
                "describe": f"live: no files, teachers run during training: {teacher_text}"}
    return {"files": files, "bytes": size, "teachers": teachers, "teacher_forwards": forwards,
            "describe": f"{files} files, {epochs} epochs x {n_images:,} images, about {human_bytes(size)}; "
                        f"{teacher_text}"}


# ---- the stored format


def plan_table(plan: EpochPlan, values: torch.Tensor, indices: torch.Tensor | None) -> pa.Table:
    n = len(plan.order)

    def fixed(arr: np.ndarray, width: int) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), width)

    cols = {
        "epoch": pa.array(np.full(n, plan.epoch, np.int32)),
        "position": pa.array(np.arange(n, dtype=np.int32)),
        "image": pa.array(plan.order.numpy().astype(np.int32)),
        "crop": fixed(plan.crops.numpy().astype(np.int16), 4),
        "flip": pa.array(plan.flips.numpy()),
        "partner": pa.array(plan.partner.numpy().astype(np.int32)),
        "mix_box": fixed(plan.mix_box.numpy().astype(np.int16), 4),
        "mix_lam": pa.array(plan.mix_lam.numpy().astype(np.float32)),
    }
    v = values.to(torch.float16).numpy()
    if indices is None:
        cols["logits"] = fixed(v, v.shape[1])
    else:
        cols["topk_values"] = fixed(v, v.shape[1])
        # class indices fit int16 below 32,768 classes: a third less per stored label than int32
        small = int(indices.max()) < 2 ** 15 if indices.numel() else True
        cols["topk_indices"] = fixed(indices.numpy().astype(np.int16 if small else np.int32), indices.shape[1])
    return pa.table(cols)


# Rows per Parquet row group of a label shard: about 16 MB of logits. Parquet's writer builds a whole row
# group's levels and pages before it writes them; one group per 50,000-row ImageNet epoch took 0.9 GB on
# top of a 0.1 GB table (bench/worker_memory.py), groups of this size about 0.1 GB.
LABEL_ROW_GROUP_BYTES = 16 * 2 ** 20


def label_row_group(table: pa.Table) -> int:
    return max(1, LABEL_ROW_GROUP_BYTES * table.num_rows // max(1, table.nbytes))


def write_label_shard(tables) -> tuple[bytes, int]:
    """A label shard's Parquet file from its epochs' tables, written one epoch at a time (the shard's epochs
    never exist together as Arrow tables) in row groups of ~LABEL_ROW_GROUP_BYTES; returns (file, rows)."""
    sink, writer, rows = io.BytesIO(), None, 0
    try:
        for table in tables:
            if writer is None:
                writer = pq.ParquetWriter(sink, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=label_row_group(table))
            rows += table.num_rows
    finally:
        if writer is not None:
            writer.close()
    blob = sink.getvalue()
    del sink
    pa.default_memory_pool().release_unused()  # the writer's buffers: give them back before the next unit
    return blob, rows


def _fixed_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    arr = col.combine_chunks()
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def read_epoch_rows(blob: bytes, epoch: int) -> pa.Table:
    """The row groups of a label shard file that hold `epoch` (their statistics name it; each epoch is written
    in row groups of its own), decoded on the calling thread (see storage.parquet_table)."""
    pf = pq.ParquetFile(pa.BufferReader(blob))
    column = pf.schema_arrow.get_field_index("epoch")
    groups = []
    for g in range(pf.num_row_groups):
        stats = pf.metadata.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max or stats.min <= epoch <= stats.max:
            groups.append(g)
    return pf.read_row_groups(groups, use_threads=False)


def read_epoch(table: pa.Table, epoch: int, mix_group: int) -> tuple[EpochPlan, torch.Tensor, torch.Tensor | None]:
    """One epoch's plan and stored label values (and top-k indices) from a label shard table."""
    import pyarrow.compute as pc
    t = table.filter(pc.equal(table.column("epoch"), epoch)).sort_by("position")
    if t.num_rows == 0:
        raise KeyError(f"epoch {epoch} not in this label shard")
    plan = EpochPlan(
        epoch=epoch,
        order=torch.from_numpy(t.column("image").to_numpy().astype(np.int64)),
        crops=torch.from_numpy(_fixed_to_numpy(t.column("crop")).astype(np.int32)),
        flips=torch.from_numpy(t.column("flip").to_numpy(zero_copy_only=False).astype(bool)),
        partner=torch.from_numpy(t.column("partner").to_numpy().astype(np.int64)),
        mix_box=torch.from_numpy(_fixed_to_numpy(t.column("mix_box")).astype(np.int32)),
        mix_lam=torch.from_numpy(t.column("mix_lam").to_numpy().astype(np.float32)),
        mix_group=mix_group,
    )
    if "logits" in t.column_names:
        return plan, torch.from_numpy(_fixed_to_numpy(t.column("logits")).astype(np.float16)), None
    values = torch.from_numpy(_fixed_to_numpy(t.column("topk_values")).astype(np.float16))
    indices = torch.from_numpy(_fixed_to_numpy(t.column("topk_indices")).astype(np.int32))
    return plan, values, indices


class LabelSource:
    """An epoch's plan and dense soft labels for one set: read from stored shards or computed live.

    Both paths call the same label code with the same seed, so they give identical labels. Stored label files
    are found through the relabel stage's combined manifest (`expected`: the identity the reading stage was bound
    to) and checked against their sha256 before use.
    """

    def __init__(self, cfg: Config, storage: Storage, set_name: str, images, num_classes: int,
                 teachers: list | None, device: torch.device, expected: dict | None = None):
        self.cfg, self.storage, self.set_name = cfg, storage, set_name
        self.images, self.num_classes, self.teachers, self.device = images, num_classes, teachers, device
        self.expected = expected
        self._store = None
        self._rows: dict[str, dict] | None = None  # label unit id -> its manifest row
        self._shard_id: str | None = None
        self._blob: bytes | None = None

    def _row(self, unit: Unit) -> dict:
        if self._rows is None:
            self._store, table = read_upstream(self.storage, RELABEL_PREFIX, self.expected)
            self._rows = {r["shard_id"]: r for r in table.select(["shard_id", "path", "bytes", "sha256"]).to_pylist()}
        if unit.id not in self._rows:
            raise StageError(f"{self.storage.uri(RELABEL_PREFIX)}: no stored labels for {unit.id}; rerun the relabel "
                             f"stage for this config")
        return self._rows[unit.id]

    def __call__(self, epoch: int) -> tuple[EpochPlan, torch.Tensor]:
        if self.cfg.relabel.mode == "live":
            plan, values, indices = compute_epoch_labels(self.cfg, self.set_name, self.images, self.teachers,
                                                         epoch, self.device)
        else:
            unit = shard_for_epoch(self.cfg, self.set_name, epoch)
            if unit.id != self._shard_id:  # one shard's file (epochs_per_shard epochs) held at a time
                self._blob = None  # the previous file is freed before the next is read, not after
                row = self._row(unit)
                self._blob = self._store.read_output(row)
                self._shard_id = unit.id
            table = read_epoch_rows(self._blob, epoch)
            plan, values, indices = read_epoch(table, epoch, self.cfg.relabel.mix_group)
            del table  # the tensors are copies: give Arrow's buffers back before the epoch's training
            pa.default_memory_pool().release_unused()
        return plan, dense_labels(values, indices, self.num_classes)


def compute_epoch_labels(cfg: Config, set_name: str, images, teachers: list, epoch: int,
                         device: torch.device) -> tuple[EpochPlan, torch.Tensor, torch.Tensor | None]:
    """One epoch's plan and soft labels; images: the set's `ImageSource` (or a normalized float tensor)."""
    rl = cfg.relabel
    plan = plan_epoch(len(images), epoch, label_seed(cfg, set_name), mix_group=rl.mix_group,
                      source_size=tuple(images.shape[-2:]), crop_scale=rl.crop_scale, cutmix=rl.cutmix)
    values, indices = soft_labels(images, plan, teachers, out_size=cfg.data.resolution, topk=rl.topk, device=device,
                                  ensemble=rl.ensemble)
    return plan, values.cpu(), None if indices is None else indices.cpu()


# ---- the stage


def relabel_stages(cfg: Config, storage: Storage, context: RunContext) -> list[Stage]:
    return [RelabelStage(cfg, storage, context)] if cfg.relabel.mode == "stored" else []


def relabel_fingerprint(cfg: Config) -> dict:
    return {"sets": sets_fingerprint(cfg), "relabel": dataclasses.asdict(cfg.relabel),
            "epochs": cfg.relabel_epochs(),
            "teachers": [dataclasses.asdict(cfg.teacher(n)) for n in cfg.relabel_teachers()]}


class RelabelStage(Stage):
    kind = "relabel"
    worker_kind = "relabel"

    @property
    def prefix(self) -> str:
        return RELABEL_PREFIX

    def units(self) -> list[Unit]:
        return [u for s in self.cfg.sets() for u in label_shards(self.cfg, s)]

    def teachers_read(self) -> list[str]:
        return self.cfg.relabel_teachers()

    def inputs(self) -> dict[str, str]:
        return set_inputs(self.cfg)

    def upstream(self) -> list[str]:
        return [*self.inputs(), *squeeze_upstream(self.cfg, self.cfg.relabel_teachers())]

    def fingerprint(self) -> dict:
        return relabel_fingerprint(self.cfg)

    def open_worker(self) -> Worker:
        return RelabelWorker(self)


class RelabelWorker(Worker):
    def __init__(self, stage: RelabelStage):
        self.stage = stage
        cfg = stage.cfg
        self.device = best_device()
        shape = model_shape(cfg, stage.context.num_classes)
        pool = load_pool(cfg.relabel_teachers(), shape, cfg, stage.storage, self.device,
                         expected=stage.upstream_identity)
        self.teachers = [pool[n] for n in cfg.relabel_teachers()]
        norm = dataset_normalization(cfg.data)
        self.sets = ImageSetCache(stage.storage, norm, cfg.data.channels, device=self.device,
                                  loader_workers=loader_workers(cfg), worker="relabel",
                                  expected=stage.upstream_identity)

    def compute(self, unit: Unit):
        cfg = self.stage.cfg
        image_set = self.sets.get(unit.payload["set"])
        images = image_set.images
        e0, e1 = unit.payload["epochs"]
        t0 = time.perf_counter()

        def epoch_tables():
            for epoch in range(e0, e1):
                plan, values, indices = compute_epoch_labels(cfg, unit.payload["set"], images, self.teachers,
                                                             epoch, self.device)
                yield plan_table(plan, values, indices)

        blob, rows = write_label_shard(epoch_tables())
        return blob, {"set": unit.payload["set"], "epoch_start": e0, "epoch_stop": e1, "rows": rows,
                      "images": len(images), "seconds": time.perf_counter() - t0, "holding": image_set.holding,
                      "peak_rss_bytes": peak_rss_bytes()}

    def commit(self, unit: Unit, computed) -> dict:
        blob, row = computed
        res = self.stage.store.commit(unit.id, [(labels_path(unit), blob)], [row])
        return {"images": 0, "committed": res.committed, "storage_retries": res.storage_retries}
