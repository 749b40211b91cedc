"""Squeeze: train every teacher whose weights are 'squeeze' on the training set, one unit per teacher.

Each unit writes the teacher's checkpoint and a manifest row with its validation accuracy (later stages read
the checkpoint through that row, checked against its sha256); a rerun skips teachers already committed. ImageNet pools come from torchvision weights or checkpoint URIs instead and
have no squeeze units.
"""
from __future__ import annotations

import dataclasses
import time

from prism_ray.algo.seeding import derive_seed
from prism_ray.algo.teachers import build_model, checkpoint_bytes
from prism_ray.algo.train import evaluate_classifier, recalibrate_bn, train_classifier
from prism_ray.config import resolved_resize
from prism_ray.data import build_dataset
from prism_ray.stages.base import Stage, Unit, Worker
from prism_ray.teacher_pool import SQUEEZE_PREFIX, best_device, checkpoint_path, model_shape

IN_MEMORY_LIMIT = 200_000  # images: below this, hold the training set as one tensor (small data sets)


def data_fingerprint(cfg) -> dict:
    """The data fields that shape real images (not the validation cap). The resize (data.resize) is recorded as
    resolved, since its default depends on the data set, and only when it is not data.resolution: a change of
    it changes every real image, and runs made before it existed keep their fingerprint."""
    d = dataclasses.asdict(cfg.data)
    d.pop("max_val", None)
    d.pop("val", None)
    d.pop("index", None)  # where the listing is kept and whether it was verified do not change any image
    d.pop("verify", None)
    d.pop("resize", None)
    resize = resolved_resize(cfg.data)
    if resize != cfg.data.resolution:
        d["resize"] = resize
    return d


class SqueezeStage(Stage):
    kind = "squeeze"
    unit_noun = "teacher"
    worker_kind = "squeeze"

    @property
    def prefix(self) -> str:
        return SQUEEZE_PREFIX

    def units(self) -> list[Unit]:
        return [Unit(spec.name, {"arch": spec.arch}) for spec in self.cfg.teachers.models if spec.weights == "squeeze"]

    def fingerprint(self) -> dict:
        trained = [dataclasses.asdict(s) for s in self.cfg.teachers.models if s.weights == "squeeze"]
        return {"seed": self.cfg.run.seed, "data": data_fingerprint(self.cfg), "teachers": trained,
                "squeeze": dataclasses.asdict(self.cfg.squeeze)}

    def open_worker(self) -> Worker:
        return SqueezeWorker(self)


class SqueezeWorker(Worker):
    def __init__(self, stage: SqueezeStage):
        self.stage = stage
        cfg = stage.cfg
        self.device = best_device()
        index = stage.context.index_uri  # the run's data index: no worker lists the data
        self.train = build_dataset(cfg.data, "train", cfg.storage, index=index)
        self.val = build_dataset(cfg.data, "val", cfg.storage, class_names=self.train.class_names, capped=False,
                                 index=index)
        # Small data sets are decoded once and trained from memory; large ones stream from the source.
        self.train_data = self.train.tensors() if len(self.train) <= IN_MEMORY_LIMIT else self.train
        val_idx = range(min(len(self.val), cfg.data.max_val or len(self.val)))
        self.val_data = self.val.tensors(list(val_idx)) if len(val_idx) <= IN_MEMORY_LIMIT else self.val

    def compute(self, unit: Unit) -> tuple[bytes, dict]:
        cfg, stage = self.stage.cfg, self.stage
        spec = cfg.teacher(unit.id)
        shape = model_shape(cfg, stage.context.num_classes)
        seed = derive_seed(cfg.run.seed, "squeeze", spec.name)
        model = build_model(spec.arch, shape, seed=seed)
        sq = cfg.squeeze
        t0 = time.perf_counter()
        stats = train_classifier(model, self.train_data, epochs=sq.epochs, batch_size=sq.batch_size, lr=sq.lr,
                                 momentum=sq.momentum, weight_decay=sq.weight_decay,
                                 label_smoothing=sq.label_smoothing, seed=seed, device=self.device)
        recalibrate_bn(model, self.train_data, device=self.device)
        acc = evaluate_classifier(model, self.val_data, device=self.device)
        row = {"teacher": spec.name, "arch": spec.arch, "val_top1": acc["top1"], "val_top5": acc["top5"],
               "train_images": len(self.train), "steps": stats["steps"], "final_loss": stats["final_loss"],
               "seconds": time.perf_counter() - t0, "device": str(self.device)}
        return checkpoint_bytes(model, spec.arch, shape, val_top1=acc["top1"]), row

    def commit(self, unit: Unit, computed: tuple[bytes, dict]) -> dict:
        blob, row = computed
        result = self.stage.store.commit(unit.id, [(checkpoint_path(unit.id), blob)], [row])
        return {"images": 0, "committed": result.committed, "storage_retries": result.storage_retries,
                "val_top1": row["val_top1"], "seconds": row["seconds"]}
