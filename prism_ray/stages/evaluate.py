"""Evaluate: students trained on every image set with its soft labels, scored on the real validation set,
and the per-class diversity of every set (and of real data).

Student units (set x student x seed) write a checkpoint to the run every `evaluate.checkpoint_every`
epochs; a unit restarted on another worker resumes from it. A student is scored on the validation set after
the last epoch and, with `evaluate.eval_every`, every few epochs (the scores travel in the checkpoint). Its
commit writes the final weights and one results row: final top-1/top-5 (after the last epoch), the best
top-1 of the scored epochs with its top-5 and epoch (the references' `model_best`), where it resumed from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import time

import numpy as np
import torch

from prism_ray.algo.diversity import streamed_class_diversity
from prism_ray.algo.image_source import stream
from prism_ray.algo.seeding import derive_seed, generator
from prism_ray.algo.student import build_student, train_student
from prism_ray.algo.teachers import ModelShape, checkpoint_bytes
from prism_ray.algo.train import evaluate_classifier
from prism_ray.config import Config
from prism_ray.data import build_dataset
from prism_ray.memory import peak_rss_bytes
from prism_ray.stages.base import RunContext, Stage, Unit, Worker
from prism_ray.stages.image_sets import ImageSetCache, loader_workers, set_inputs, sets_fingerprint
from prism_ray.stages.relabel import RELABEL_PREFIX, LabelSource, relabel_fingerprint
from prism_ray.storage import (CHECKPOINTS, IntegrityError, ShardStore, Storage, retrying, sha256,
                               table_bytes)
from prism_ray.teacher_pool import best_device, load_pool, model_shape, squeeze_upstream

REPORT = "report"  # the run's report, written from the evaluate stages' outputs
STUDENTS_PREFIX = "evaluate/students"
DIVERSITY_PREFIX = "evaluate/diversity"
REAL = "real"  # the diversity of real training images, next to the sets'
REAL_PER_CLASS = 100  # real images per class for the real-data diversity reference


def evaluate_stages(cfg: Config, storage: Storage, context: RunContext) -> list[Stage]:
    return [DiversityStage(cfg, storage, context), StudentStage(cfg, storage, context)]


def diversity_network(cfg: Config) -> str:
    return cfg.evaluate.diversity_network or cfg.recover.primary


class DiversityStage(Stage):
    kind = "evaluate"
    unit_noun = "set"
    worker_kind = "diversity"

    @property
    def prefix(self) -> str:
        return DIVERSITY_PREFIX

    def units(self) -> list[Unit]:
        return [Unit(s, {"set": s}) for s in [*self.cfg.sets(), REAL]]

    def teachers_read(self) -> list[str]:
        return [diversity_network(self.cfg)]

    def inputs(self) -> dict[str, str]:
        return set_inputs(self.cfg)

    def upstream(self) -> list[str]:
        return [*self.inputs(), *squeeze_upstream(self.cfg, [diversity_network(self.cfg)])]

    def fingerprint(self) -> dict:
        net = diversity_network(self.cfg)
        return {"sets": sets_fingerprint(self.cfg), "network": dataclasses.asdict(self.cfg.teacher(net)),
                "real_per_class": REAL_PER_CLASS}

    def open_worker(self) -> Worker:
        return DiversityWorker(self)


class DiversityWorker(Worker):
    def __init__(self, stage: DiversityStage):
        self.stage = stage
        cfg = stage.cfg
        self.device = best_device()
        self.network = diversity_network(cfg)
        self.model = load_pool([self.network], model_shape(cfg, stage.context.num_classes), cfg, stage.storage,
                               self.device, expected=stage.upstream_identity)[self.network]
        self.train = build_dataset(cfg.data, "train", cfg.storage, index=stage.context.index_uri)
        self.workers = loader_workers(cfg)
        self.sets = ImageSetCache(stage.storage, self.train.normalization, cfg.data.channels, device=self.device,
                                  loader_workers=self.workers, worker="diversity", expected=stage.upstream_identity)

    def real_sample(self) -> list[int]:
        """Dataset indices of the real-data reference: REAL_PER_CLASS seeded picks per class, class by class."""
        sample = []
        starts = np.concatenate([[0], np.cumsum(self.train.counts())])
        order = np.argsort(self.train.labels, kind="stable")  # dataset positions, grouped by class
        for c in range(self.train.num_classes):
            g = generator(self.stage.cfg.run.seed, "diversity-real", c)
            picks = torch.randperm(self.train.count(c), generator=g)[:REAL_PER_CLASS].tolist()
            sample += [int(order[starts[c] + k]) for k in picks]
        return sample

    def _batches(self, unit: Unit):
        """(images, labels) batches of the unit's set, on the device: never the whole set as float."""
        batch = self.stage.cfg.evaluate.val_batch_size
        if unit.id == REAL:  # decoded and resized in DataLoader workers, batch by batch
            self.sets.drop()  # no set is needed here: do not hold one under the streamed batches
            subset = torch.utils.data.Subset(self.train, self.real_sample())
            yield from stream(subset, batch, num_workers=self.workers, device=self.device)
            return
        s = self.sets.get(unit.id)
        n = len(s)
        ranges = [(a, min(a + batch, n)) for a in range(0, n, batch)]
        order = torch.arange(n)
        for (a, b), pixels in zip(ranges, s.images.batches(order, ranges, self.device)):
            yield s.images.to_network(pixels), s.labels[a:b]

    def compute(self, unit: Unit):
        t0 = time.perf_counter()
        acc = streamed_class_diversity(self.model, self._batches(unit), device=self.device)
        per_class = acc.result()
        rows = [{"set": unit.id, "class_id": int(c), "mean_cosine": float(v), "images": acc.count(c)}
                for c, v in per_class.items()]
        import pyarrow as pa
        return table_bytes(pa.Table.from_pylist(rows)), {
            "set": unit.id, "network": self.network, "mean_cosine": float(sum(per_class.values()) / len(per_class)),
            "classes": len(per_class), "seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes()}

    def commit(self, unit: Unit, computed) -> dict:
        blob, row = computed
        res = self.stage.store.commit(unit.id, [(f"per_class/{unit.id}.parquet", blob)], [row])
        return {"images": 0, "committed": res.committed, "storage_retries": res.storage_retries}


class StudentStage(Stage):
    kind = "evaluate"
    unit_noun = "student"
    worker_kind = "student"

    @property
    def prefix(self) -> str:
        return STUDENTS_PREFIX

    def units(self) -> list[Unit]:
        e = self.cfg.evaluate
        return [Unit(f"{s}--{arch}--seed{seed}", {"set": s, "student": arch, "seed": seed})
                for s in self.cfg.sets() for arch in e.students for seed in e.seeds]

    def teachers_read(self) -> list[str]:
        return self.cfg.relabel_teachers() if self.cfg.relabel.mode == "live" else []

    def inputs(self) -> dict[str, str]:
        needs = set_inputs(self.cfg)
        if self.cfg.relabel.mode == "stored":
            needs[RELABEL_PREFIX] = ("the stored soft labels are not complete; run the relabel stage first (prism-ray "
                                     "relabel CONFIG)")
        return needs

    def upstream(self) -> list[str]:
        live = self.cfg.relabel_teachers() if self.cfg.relabel.mode == "live" else []
        return [*self.inputs(), *squeeze_upstream(self.cfg, live)]

    def on_reset(self) -> None:
        retire_report(self.storage, self.cfg.recover.ipc)

    def fingerprint(self) -> dict:
        d = dataclasses.asdict(self.cfg.data)
        return {"labels": relabel_fingerprint(self.cfg), "evaluate": dataclasses.asdict(self.cfg.evaluate),
                "val": {"val": d["val"], "max_val": d["max_val"]}}

    def open_worker(self) -> Worker:
        return StudentWorker(self)


def retire_report(storage: Storage, ipc: int) -> None:
    """The students start over: the run's report is stale. A report of another IPC (the run grows) moves to
    report/ipc<N>/; one of this IPC, made from outputs that are being redone, to report/superseded/<time>/."""
    try:
        old = storage.read_json(f"{REPORT}/report.json").get("ipc")
    except FileNotFoundError:
        return
    target = f"{REPORT}/ipc{old}" if old is not None and old != ipc else \
        f"{REPORT}/superseded/{time.strftime('%Y%m%d-%H%M%S')}"
    for key in storage.list(REPORT):
        name = key.rsplit("/", 1)[-1]
        if "." in name:  # files only; earlier archives are folders
            storage.write_bytes(f"{target}/{name}", storage.read_bytes(key))
            storage.delete(key)


class Checkpoints:
    """A student unit's checkpoint in the stage's generation, keyed by the unit and the stage's lineage digest (its
    config and the upstream outputs it was bound to): a checkpoint of another config or of other labels is never
    resumed from. A pointer (JSON) names the current file with its sha256; files are loaded with weights_only."""

    def __init__(self, store: ShardStore, unit: Unit, lineage: str):
        self.store = store
        self.base = f"{CHECKPOINTS}/{unit.id}-{lineage}"

    @property
    def pointer(self) -> str:
        return self.store.key(f"{self.base}.json")

    def load(self) -> dict | None:
        storage = self.store.storage
        try:
            ref = retrying(f"read {storage.uri(self.pointer)}", lambda: storage.read_json(self.pointer))
        except FileNotFoundError:
            return None
        try:
            data = self.store.read_output(ref)
        except IntegrityError as e:  # a checkpoint is a shortcut, never a reason to fail: train from the start
            print(f"[student pid {os.getpid()}] not resuming: {e}", file=sys.stderr, flush=True)
            return None
        try:  # weights_only: whoever can write the run prefix must not be able to run code here
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - not a checkpoint this code wrote: train from the start
            print(f"[student pid {os.getpid()}] not resuming from {ref['path']}: {type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr, flush=True)
            return None

    def save(self, state: dict, epoch: int) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        storage = self.store.storage
        previous = None
        with contextlib.suppress(FileNotFoundError):
            previous = storage.read_json(self.pointer)["path"]
        rel = f"{self.base}.e{epoch:05d}.pt"
        ref = {"path": rel, "bytes": len(data), "sha256": sha256(data), "epoch": epoch}
        retrying(f"checkpoint {storage.uri(self.store.key(rel))}", lambda: storage.write_bytes(self.store.key(rel), data))
        retrying(f"checkpoint {storage.uri(self.pointer)}", lambda: storage.write_json(self.pointer, ref))
        if previous and previous != rel:
            with contextlib.suppress(Exception):
                storage.delete(self.store.key(previous))

    def clear(self) -> None:
        storage = self.store.storage
        with contextlib.suppress(Exception):
            path = storage.read_json(self.pointer)["path"]
            storage.delete(self.store.key(path))
        with contextlib.suppress(Exception):
            storage.delete(self.pointer)


class StudentWorker(Worker):
    def __init__(self, stage: StudentStage):
        self.stage = stage
        cfg = stage.cfg
        self.device = best_device()
        train = build_dataset(cfg.data, "train", cfg.storage, index=stage.context.index_uri)
        val = build_dataset(cfg.data, "val", cfg.storage, class_names=train.class_names, capped=False,
                            index=stage.context.index_uri)
        n_val = min(len(val), cfg.data.max_val or len(val))
        # streamed through DataLoader workers at scoring time: memory does not grow with the validation set
        self.val = val if n_val == len(val) else torch.utils.data.Subset(val, range(n_val))
        self.workers = loader_workers(cfg)
        self.sets = ImageSetCache(stage.storage, train.normalization, cfg.data.channels, device=self.device,
                                  loader_workers=self.workers, worker="student", expected=stage.upstream_identity)
        self.lineage = stage.lineage_digest
        self.teachers = None
        if cfg.relabel.mode == "live":  # the teachers run inside training: load them once
            pool = load_pool(cfg.relabel_teachers(), model_shape(cfg, stage.context.num_classes), cfg,
                             stage.storage, self.device, expected=stage.upstream_identity)
            self.teachers = [pool[n] for n in cfg.relabel_teachers()]

    def compute(self, unit: Unit):
        st, cfg = self.stage, self.stage.cfg
        storage = st.storage
        p = unit.payload
        image_set = self.sets.get(p["set"])
        shape = ModelShape(st.context.num_classes, cfg.data.channels, cfg.data.resolution)
        # not seeded by the set: seed n starts from the same weights on every set (a paired comparison)
        seed = derive_seed(cfg.run.seed, "student", p["student"], p["seed"])
        model = build_student(p["student"], shape, seed)
        checkpoints = Checkpoints(st.store, unit, self.lineage)
        state = checkpoints.load()  # a restarted unit resumes from its last checkpoint
        resumed_from = int(state["epoch"]) if state else 0
        labels = LabelSource(cfg, storage, p["set"], image_set.images, st.context.num_classes, self.teachers,
                             self.device, expected=(st.upstream_identity or {}).get(RELABEL_PREFIX))
        every = cfg.evaluate.checkpoint_every

        def on_epoch_end(epoch: int, current: dict) -> None:
            if (epoch + 1) % every == 0 and epoch + 1 < cfg.evaluate.epochs:
                checkpoints.save(current, epoch + 1)

        def score(m) -> dict:
            return evaluate_classifier(m, self.val, batch_size=cfg.evaluate.val_batch_size, device=self.device,
                                       num_workers=self.workers)

        out = train_student(model, image_set.images, labels, cfg.evaluate, out_size=cfg.data.resolution,
                            device=self.device, state=state, on_epoch_end=on_epoch_end, targets=image_set.labels,
                            seed=seed, score=score)
        scores = out["scores"]
        if not scores or scores[-1]["epoch"] != cfg.evaluate.epochs:  # nothing left to train: score the weights
            scores.append({"epoch": cfg.evaluate.epochs, **score(model)})
        acc = scores[-1]
        best = max(scores, key=lambda s: s["top1"])  # the first of equals, as the reference's `top1 > best`
        row = {"set": p["set"], "student": p["student"], "seed": p["seed"], "top1": acc["top1"], "top5": acc["top5"],
               "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
               "scored_epochs": len(scores), "epochs": cfg.evaluate.epochs, "resumed_from_epoch": resumed_from,
               "final_loss": out["final_loss"],
               "train_seconds": out["seconds"], "images": len(image_set), "label_mode": cfg.relabel.mode,
               "val_images": len(self.val), "holding": image_set.holding, "peak_rss_bytes": peak_rss_bytes()}
        return checkpoint_bytes(model, p["student"], shape), row

    def commit(self, unit: Unit, computed) -> dict:
        blob, row = computed
        res = self.stage.store.commit(unit.id, [(f"weights/{unit.id}.pt", blob)], [row])
        Checkpoints(self.stage.store, unit, self.lineage).clear()
        return {"images": 0, "committed": res.committed, "storage_retries": res.storage_retries, "top1": row["top1"]}
