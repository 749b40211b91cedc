"""A run's record: where it lives, the resolved config and data facts written at its start.

Everything that reads a run (the pipeline, `plan`, `status`, `report`) starts here, so these names live
below all of them.
"""
from __future__ import annotations

import time

from prism_ray.config import Config
from prism_ray.data import build_dataset
from prism_ray.stages.base import RunContext
from prism_ray.storage import Storage

RUN_RECORD = "run.json"


def open_storage(cfg: Config) -> Storage:
    return Storage(cfg.run.output, cfg.storage)


def data_context(cfg: Config) -> RunContext:
    """Class names and per-class counts of the (capped) training set."""
    train = build_dataset(cfg.data, "train", cfg.storage)
    return RunContext(train.num_classes, train.class_names, train.counts())


def record_run(cfg: Config, storage: Storage, context: RunContext) -> None:
    storage.write_json(RUN_RECORD, {"config": cfg.to_dict(redact=True), "context": context.to_json(),
                                    "started": time.time()})
