"""Imported sets: an image set made elsewhere becomes a set of the run like `prism` or `random_real`.

The driver lists and checks the whole source before the stage starts (`prepare`: every image decoded, classes
mapped, IPC counted; `data/set_source.py` has the rules), so bad input stops the run before anything of the set
is committed. The index is kept with the set (``recover/<set>/source-index.parquet``, plus a summary in
``source.json``): a resumed run reads it and lists nothing. Units are class groups (`recover.class_group`);
each reads its images from the source, checks them against the index's checksums, converts those that need it
and commits them through the stage's `ShardStore` as recover commits its images, so relabel, evaluate, the
report and export read an imported set exactly as they read the run's own.
"""
from __future__ import annotations

import time

import pyarrow as pa

from prism_ray.config import Config, ImportedSetConfig
from prism_ray.data.set_source import SourceIndex, index_source, prepare_image, read_source, source_spec
from prism_ray.stages.base import RunContext, Stage, StageError, Unit, Worker
from prism_ray.stages.recover import IMAGE_SCHEMA, image_path, recover_prefix
from prism_ray.stages.squeeze import data_fingerprint
from prism_ray.storage import Storage

SOURCE_INDEX = "source-index.parquet"
SOURCE_SUMMARY = "source.json"
# An imported image's manifest row: a set's columns, plus where it came from and whether it was converted.
IMPORT_SCHEMA = IMAGE_SCHEMA.append(pa.field("source", pa.string())).append(pa.field("converted", pa.bool_()))


def imported_stages(cfg: Config, storage: Storage, context: RunContext) -> list[Stage]:
    return [ImportStage(cfg, storage, context, name, spec) for name, spec in cfg.baselines.imported.items()]


def plan_groups(num_classes: int, class_group: int) -> list[Unit]:
    width = max(4, len(str(num_classes - 1)))
    return [Unit(f"cls{a:0{width}d}-{min(a + class_group, num_classes) - 1:0{width}d}",
                 {"class_ids": list(range(a, min(a + class_group, num_classes)))})
            for a in range(0, num_classes, class_group)]


def read_summary(storage: Storage, set_name: str) -> dict | None:
    """An imported set's summary (source, IPC per class, converted images), or None for other sets."""
    try:
        return storage.read_json(f"{recover_prefix(set_name)}/{SOURCE_SUMMARY}")
    except FileNotFoundError:
        return None


class ImportStage(Stage):
    kind = "recover"
    unit_noun = "group"
    kept = (SOURCE_INDEX, SOURCE_SUMMARY)  # a resumed run reads them, the source may be gone

    def __init__(self, cfg: Config, storage: Storage, context: RunContext, set_name: str, spec: ImportedSetConfig):
        super().__init__(cfg, storage, context)
        self.set_name, self.spec = set_name, spec
        self._source: SourceIndex | None = None
        self.note: str | None = None  # what `check_source` found, for the driver to show

    def __getstate__(self) -> dict:  # workers read the stored index: do not ship the driver's copy to each
        return {**self.__dict__, "_source": None}

    @property
    def prefix(self) -> str:
        return recover_prefix(self.set_name)

    @property
    def declared_ipc(self) -> int:
        return self.cfg.imported_ipc(self.set_name)

    def spec_dict(self) -> dict:
        d = self.cfg.data
        return source_spec(self.spec, self.declared_ipc, self.context.class_names, d.channels, d.resolution)

    def stored_source(self) -> SourceIndex | None:
        """The index kept with the set, when it was made from the same source and settings."""
        summary = read_summary(self.storage, self.set_name)
        if summary is None or summary.get("spec") != self.spec_dict():
            return None
        try:
            index = SourceIndex.from_bytes(self.storage.read_bytes(f"{self.prefix}/{SOURCE_INDEX}"))
        except FileNotFoundError:
            return None
        return index if index.digest() == summary["digest"] else None

    def check_source(self, fresh: bool = False) -> str:
        """Index the source (or read the index kept with the set): the driver calls it before anything runs."""
        if self._source is None:
            self._source = None if fresh else self.stored_source()
            if self._source is None:
                d = self.cfg.data
                self._source = index_source(self.set_name, self.spec, self.context.class_names, d.channels,
                                            d.resolution, self.declared_ipc, self.cfg.storage)
            self.note = self._source.describe(self.cfg.data.resolution, self.cfg.data.channels)
        return self.note

    @property
    def source(self) -> SourceIndex:
        self.check_source()
        return self._source

    def units(self) -> list[Unit]:
        return plan_groups(self.context.num_classes, self.cfg.recover.class_group)

    def images_per_unit(self, unit: Unit) -> int:
        counts = self.source.counts()
        return sum(counts[c] for c in unit.payload["class_ids"])

    def fingerprint(self) -> dict:
        return {"data": data_fingerprint(self.cfg), "source": self.spec_dict(), "digest": self.source.digest(),
                "class_group": self.cfg.recover.class_group}

    def prepare(self, fresh: bool = False) -> None:
        """Take up the generation, then keep the index with the set (before the first unit can commit)."""
        super().prepare(fresh=fresh)
        source = self.source
        summary = read_summary(self.storage, self.set_name)
        if summary is None or summary.get("digest") != source.digest() or summary.get("spec") != source.spec:
            self.storage.write_bytes(f"{self.prefix}/{SOURCE_INDEX}", source.to_bytes())
            self.storage.write_json(f"{self.prefix}/{SOURCE_SUMMARY}",
                                    {**source.summary(), "spec": source.spec, "method": self.spec.method})

    def open_worker(self) -> Worker:
        return ImportWorker(self)


class ImportWorker(Worker):
    def __init__(self, stage: ImportStage):
        self.stage = stage
        self.index = SourceIndex.from_bytes(stage.storage.read_bytes(f"{stage.prefix}/{SOURCE_INDEX}"))
        # the index is kept beside the generations: it must be the one this stage's record was made from
        recorded = (stage.record() or {}).get("config") or {}
        if recorded.get("digest") != self.index.digest():
            raise StageError(f"{stage.name}: {stage.storage.uri(f'{stage.prefix}/{SOURCE_INDEX}')} is not the index "
                             f"this stage's record was made from; rerun the recover stage to index the set again")
        self.rows = self.index.rows()

    def compute(self, unit: Unit):
        st = self.stage
        t0 = time.perf_counter()
        wanted = set(unit.payload["class_ids"])
        rows = [r for r in self.rows if r["class_id"] in wanted]
        blobs = read_source(self.index, rows, st.spec.image_column, st.cfg.storage)
        outputs, records = [], []
        for r, blob in zip(rows, blobs):
            source = r["path"] if self.index.format == "image_folder" else \
                f"{r['path']}#rowgroup={r['row_group']}&row={r['offset']}"
            data, ext, converted = prepare_image(blob, f"{self.index.uri}/{source}", st.cfg.data.channels,
                                                 st.cfg.data.resolution)
            outputs.append((image_path(r["class_id"], r["ipc_index"], ext), data))
            records.append({"class_id": r["class_id"], "ipc_index": r["ipc_index"], "iterations": 0, "bn_teachers": [],
                            "source": source, "converted": converted})
        seconds = time.perf_counter() - t0
        for rec in records:
            rec["seconds"] = seconds / max(1, len(records))
        return outputs, records

    def commit(self, unit: Unit, computed) -> dict:
        outputs, rows = computed
        res = self.stage.store.commit(unit.id, outputs, rows, schema=IMPORT_SCHEMA)
        return {"images": len(outputs), "committed": res.committed, "storage_retries": res.storage_retries}
