"""Recover: cross-class shards of synthetic images (one per IPC index x class group), and the random-real set.

Every set the run relabels and evaluates is written the same way, in the stage's generation folder
``recover/<set>/<generation>/``: images under ``images/<class id>/<class id>_ipc<k>.<attempt>.<ext>`` (an
ImageFolder itself), one Parquet manifest per shard, and a combined ``manifest.parquet`` when the set is
complete.
"""
from __future__ import annotations

import dataclasses
import time

import pyarrow as pa
import torch

from prism_ray.algo.encode import encode_pixels, file_extension, to_uint8
from prism_ray.algo.seeding import derive_seed, generator
from prism_ray.algo.similarity import ssim
from prism_ray.algo.synthesize import ShardSpec, synthesize_shard
from prism_ray.config import RANDOM_REAL, Config, RecoverConfig
from prism_ray.data import build_dataset
from prism_ray.stages.base import RunContext, Stage, Unit, Worker
from prism_ray.stages.squeeze import data_fingerprint
from prism_ray.storage import Storage
from prism_ray.teacher_pool import best_device, load_pool, model_shape, squeeze_upstream

# Manifest columns of every image set (recover shards and random real), in this order.
IMAGE_SCHEMA = pa.schema([
    ("class_id", pa.int32()), ("ipc_index", pa.int32()), ("path", pa.string()), ("bytes", pa.int64()),
    ("sha256", pa.string()), ("shard_id", pa.string()), ("seed", pa.int64()), ("primary_teacher", pa.string()),
    ("bn_teachers", pa.list_(pa.string())), ("bn_teacher_usage", pa.string()), ("iterations", pa.int32()),
    ("loss_ce", pa.float64()), ("loss_bn", pa.float64()), ("seconds", pa.float64()), ("source_index", pa.int64()),
    ("init_ssim", pa.float64()), ("init_ssim_ref", pa.string()),
])
# init_ssim: how much of a real image the synthetic image keeps (SSIM of the final pixels, algo/similarity.py)
# against the k-th real training image of its class (k = its IPC index). init_ssim_ref says what that image
# is: "init" when the image started from it (init real), "kth_real" when it started from noise (a reference
# level: the same comparison for an image that never saw that real image). Empty for the random-real set.
INIT_REF, KTH_REAL_REF = "init", "kth_real"


def recover_prefix(set_name: str) -> str:
    return f"recover/{set_name}"


def image_path(class_id: int, ipc_index: int, ext: str) -> str:
    return f"images/{class_id:05d}/{class_id:05d}_ipc{ipc_index:04d}.{ext}"


def plan_shards(num_classes: int, ipc: int, class_group: int) -> list[Unit]:
    """Every shard of a recover: (IPC index, group of consecutive classes), ids stable and sortable."""
    width = max(4, len(str(num_classes - 1)))
    units = []
    for k in range(ipc):
        for start in range(0, num_classes, class_group):
            classes = list(range(start, min(start + class_group, num_classes)))
            sid = f"ipc{k:04d}-cls{classes[0]:0{width}d}-{classes[-1]:0{width}d}"
            units.append(Unit(sid, {"ipc_index": k, "class_ids": classes}))
    return units


def recover_stages(cfg: Config, storage: Storage, context: RunContext) -> list[Stage]:
    stages: list[Stage] = [RecoverStage(cfg, storage, context, name, rc) for name, rc in cfg.recover_methods().items()]
    if cfg.baselines.random_real:
        stages.append(RandomRealStage(cfg, storage, context))
    return stages


def _teacher_names(rc: RecoverConfig) -> list[str]:
    return list(dict.fromkeys([rc.primary, *rc.bn_pool, *rc.fixed]))


class RecoverStage(Stage):
    kind = "recover"
    worker_kind = "recover"

    def __init__(self, cfg: Config, storage: Storage, context: RunContext, set_name: str, rc: RecoverConfig):
        super().__init__(cfg, storage, context)  # config.check_data_facts has checked ipc against the classes
        self.set_name, self.rc = set_name, rc

    @property
    def prefix(self) -> str:
        return recover_prefix(self.set_name)

    def units(self) -> list[Unit]:
        return plan_shards(self.context.num_classes, self.rc.ipc, self.rc.class_group)

    def images_per_unit(self, unit: Unit) -> int:
        return len(unit.payload["class_ids"])

    def teachers_read(self) -> list[str]:
        return _teacher_names(self.rc)

    def upstream(self) -> list[str]:
        return squeeze_upstream(self.cfg, _teacher_names(self.rc))

    def fingerprint(self) -> dict:
        used = [dataclasses.asdict(self.cfg.teacher(n)) for n in _teacher_names(self.rc)]
        fp = {"seed": self.cfg.run.seed, "data": data_fingerprint(self.cfg), "teachers": used,
              "recover": dataclasses.asdict(self.rc)}
        if any(t["weights"] == "squeeze" for t in used):
            fp["squeeze"] = dataclasses.asdict(self.cfg.squeeze)
        return fp

    def open_worker(self) -> Worker:
        return RecoverWorker(self)


class RecoverWorker(Worker):
    """Keeps the teacher pool and the training set index for every shard it synthesizes."""

    def __init__(self, stage: RecoverStage):
        self.stage = stage
        cfg = stage.cfg
        self.device = best_device()
        self.data = build_dataset(cfg.data, "train", cfg.storage, index=stage.context.index_uri)
        shape = model_shape(cfg, stage.context.num_classes)
        self.pool = load_pool(_teacher_names(stage.rc), shape, cfg, stage.storage, self.device,
                              expected=stage.upstream_identity)
        self.shape = (shape.in_channels, shape.resolution, shape.resolution)

    def compute(self, unit: Unit):
        st = self.stage
        k, classes = unit.payload["ipc_index"], unit.payload["class_ids"]
        # recover.draw_per ipc: every class group of IPC index k draws the same teachers (the reference's draw)
        teacher_seed = derive_seed(st.cfg.run.seed, "recover", st.set_name, "teachers-ipc", k) \
            if st.rc.draw_per == "ipc" else None
        spec = ShardSpec(unit.id, k, tuple(classes), derive_seed(st.cfg.run.seed, "recover", st.set_name, unit.id),
                         teacher_seed)
        init = self.data.images_at(classes, k) if st.rc.init == "real" else None
        result = synthesize_shard(self.pool, spec, st.rc, self.data.normalization, init, self.device,
                                  shape=self.shape)
        return result, self.retention(classes, k, result.images, init)

    def retention(self, classes: list[int], k: int, images: torch.Tensor,
                  init: torch.Tensor | None) -> list[tuple[float | None, str | None]]:
        """(init_ssim, init_ssim_ref) per image: SSIM of its 8-bit pixels to the k-th real image of its class."""
        ref = INIT_REF if init is not None else KTH_REAL_REF
        have = [i for i, c in enumerate(classes) if k < self.data.count(c)]  # noise init may exceed a class
        out: list[tuple[float | None, str | None]] = [(None, None)] * len(classes)
        if not have:
            return out
        real = init if init is not None else self.data.images_at([classes[i] for i in have], k)
        norm = self.data.normalization
        # the pixels as saved (8 bits; before JPEG, whose loss would count as lost content)
        scores = ssim(to_uint8(images[have], norm) / 255.0, to_uint8(real, norm) / 255.0).tolist()
        for i, v in zip(have, scores):
            out[i] = (float(v), ref)
        return out

    def commit(self, unit: Unit, computed) -> dict:
        result, retention = computed
        outputs, rows = [], []
        for data, record, (score, ref) in zip(result.encoded, result.records, retention):
            outputs.append((image_path(record.class_id, record.ipc_index, result.extension), data))
            rows.append({**record.to_row(), "source_index": None, "init_ssim": score, "init_ssim_ref": ref})
        committed = self.stage.store.commit(unit.id, outputs, rows, schema=IMAGE_SCHEMA)
        return {"images": len(outputs), "committed": committed.committed,
                "storage_retries": committed.storage_retries, "seconds": result.seconds,
                "loss_ce": sum(r.loss_ce for r in result.records) / len(result.records)}


LAYOUT = "one unit per ipc index x class group"  # random real; earlier runs had one unit per class group


class RandomRealStage(Stage):
    """The baseline the literature says comes close: IPC real training images per class, seeded."""

    kind = "recover"

    set_name = RANDOM_REAL

    @property
    def prefix(self) -> str:
        return recover_prefix(RANDOM_REAL)

    def units(self) -> list[Unit]:
        # The recover layout (IPC index x class group): raising the IPC adds units and leaves the others be.
        return plan_shards(self.context.num_classes, self.cfg.recover.ipc, self.cfg.recover.class_group)

    def images_per_unit(self, unit: Unit) -> int:
        return len(unit.payload["class_ids"])

    def fingerprint(self) -> dict:
        rc = self.cfg.recover
        return {"seed": self.cfg.run.seed, "data": data_fingerprint(self.cfg), "ipc": rc.ipc,
                "image_format": rc.image_format, "jpeg_quality": rc.jpeg_quality, "layout": LAYOUT}

    def open_worker(self) -> Worker:
        return RandomRealWorker(self)


class RandomRealWorker(Worker):
    def __init__(self, stage: RandomRealStage):
        self.stage = stage
        self.data = build_dataset(stage.cfg.data, "train", stage.cfg.storage, index=stage.context.index_uri)

    def picks(self, class_id: int) -> list[int]:
        """The class's chosen image numbers (k in 'k-th image of the class'), seeded per class.

        A prefix of one seeded permutation of the class: a set grown from IPC 10 to 50 keeps its first 10
        picks, image for image.
        """
        g = generator(self.stage.cfg.run.seed, RANDOM_REAL, class_id)
        return torch.randperm(self.data.count(class_id), generator=g)[: self.stage.cfg.recover.ipc].tolist()

    def compute(self, unit: Unit):
        rc = self.stage.cfg.recover
        t0 = time.perf_counter()
        outputs, rows = [], []
        ext = file_extension(rc.image_format)
        seed = derive_seed(self.stage.cfg.run.seed, RANDOM_REAL)
        ipc_index = unit.payload["ipc_index"]
        for c in unit.payload["class_ids"]:
            k = self.picks(c)[ipc_index]
            pixels = (self.data.pixels_at([c], k)[0] * 255).round().to(torch.uint8)
            outputs.append((image_path(c, ipc_index, ext), encode_pixels(pixels, rc.image_format, rc.jpeg_quality)))
            rows.append({"class_id": c, "ipc_index": ipc_index, "seed": seed, "iterations": 0,
                         "source_index": self.data.source_index(c, k), "bn_teachers": []})
        seconds = time.perf_counter() - t0
        for r in rows:
            r["seconds"] = seconds / len(rows)
        return outputs, rows

    def commit(self, unit: Unit, computed) -> dict:
        outputs, rows = computed
        res = self.stage.store.commit(unit.id, outputs, rows, schema=IMAGE_SCHEMA)
        return {"images": len(outputs), "committed": res.committed, "storage_retries": res.storage_retries}
