"""A run's record: where it lives, the resolved config and data facts written at its start.

Everything that reads a run (the pipeline, `plan`, `status`, `report`) starts here, so these names live
below all of them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from prism_ray.config import Config
from prism_ray.data import DataError
from prism_ray.data.index import DataIndex, build_indexes, load_indexes, resolve_uri, write_indexes
from prism_ray.stages.base import RunContext
from prism_ray.storage import Storage, redact, retrying

RUN_RECORD = "run.json"
DATA_PREFIX = "data"  # RUN/data/{train,val}-index.parquet: the run's data index


def open_storage(cfg: Config) -> Storage:
    return Storage(cfg.run.output, cfg.storage)


@dataclass
class RunData:
    """The data indexes a run uses, where workers read them, and whether they still have to be written."""

    indexes: dict[str, DataIndex]
    uri: str
    listed: bool  # listed by this call: not in storage yet


def resolve_data(cfg: Config, storage: Storage, verify: bool = True) -> RunData:
    """The run's data indexes: data.index when set, else the run's own when it was listed from the data the
    config names, else a new listing (checked, images decoded per data.verify unless `verify` is False; not
    yet written). Writes nothing."""
    if cfg.data.index:
        uri = resolve_uri(cfg.data.index)
        return RunData(load_indexes(cfg.data, uri, cfg.storage, shared=True), uri, False)
    uri = storage.full_uri(DATA_PREFIX)
    found = load_indexes(cfg.data, uri, cfg.storage)
    if found is not None:
        return RunData(found, uri, False)
    return RunData(build_indexes(cfg.data, cfg.storage, verify), uri, True)


def context_for(cfg: Config, data: RunData) -> RunContext:
    """Class names and per-class counts of the (capped) training set, from its index."""
    train = data.indexes["train"]
    names, counts = list(train.class_names), train.counts()
    if cfg.data.classes:
        if cfg.data.classes > len(names):
            raise DataError(f"data.classes={cfg.data.classes} but the training set has only {len(names)} classes")
        names, counts = names[:cfg.data.classes], counts[:cfg.data.classes]
    if cfg.data.max_per_class:
        counts = [min(c, cfg.data.max_per_class) for c in counts]
    return RunContext(len(names), names, counts, index_uri=None if data.listed else data.uri)


def record_data(cfg: Config, storage: Storage, data: RunData) -> RunContext:
    """Write a new listing into the run (RUN/data); the context then points workers at it."""
    if data.listed:
        write_indexes(data.uri, data.indexes, cfg.storage)
        data.listed = False
    return context_for(cfg, data)


def data_context(cfg: Config, storage: Storage | None = None, write: bool = True) -> RunContext:
    """The run's data facts, listing the data only when no index exists; `write`: keep a new listing in the
    run (else nothing is written and no image decoded: `plan`)."""
    storage = storage or open_storage(cfg)
    data = resolve_data(cfg, storage, verify=write)
    return record_data(cfg, storage, data) if write else context_for(cfg, data)


def index_data(cfg: Config, out: str | None = None) -> tuple[str, dict[str, DataIndex]]:
    """`prism-ray index`: list the data afresh into `out` (default: data.index, else RUN/data)."""
    out = out or cfg.data.index or open_storage(cfg).full_uri(DATA_PREFIX)
    indexes = build_indexes(cfg.data, cfg.storage)  # nothing is written before the data passes its checks
    target = Storage(out, cfg.storage)
    target.check_writable()
    write_indexes(target.full_uri(), indexes, cfg.storage)
    return target.uri(), indexes


def record_run(cfg: Config, storage: Storage, context: RunContext) -> None:
    record = {"config": cfg.to_dict(redact=True), "context": redact(context.to_json()), "started": time.time()}
    retrying("the run's record", lambda: storage.write_json(RUN_RECORD, record))
