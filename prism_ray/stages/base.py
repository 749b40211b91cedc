"""What a stage is, apart from where it runs: a list of units of work, and a worker that does one unit.

A stage plans its units (recover shards, teachers to train, label shards, student trainings); a worker,
opened once per process, loads what every unit needs (teachers, data) and runs units one at a time,
committing each unit's outputs through the stage's `ShardStore` itself. Executors (in-process, Ray)
only decide which units to hand to which worker, so that every stage shares one dispatch loop.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

from prism_ray.config import Config
from prism_ray.storage import COMBINED, ShardStore, Storage


@dataclass(frozen=True)
class Unit:
    """One unit of work: a stable id (its manifest name) and a small picklable payload."""

    id: str
    payload: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class RunContext:
    """Facts about the data that every stage needs, computed once by the driver."""

    num_classes: int
    class_names: list[str]
    train_counts: list[int]
    # Folder of the data index (train-index.parquet, val-index.parquet) workers read instead of listing;
    # None: a worker lists the data itself.
    index_uri: Optional[str] = None

    def to_json(self) -> dict:
        return {"num_classes": self.num_classes, "class_names": self.class_names, "train_counts": self.train_counts,
                "index_uri": self.index_uri}


class StageError(RuntimeError):
    """A stage cannot start or finish: the message says why and what to do."""


class ConfigMismatch(StageError):
    """The run's committed outputs were made with a different config."""

    def __init__(self, stage: str, fields: list[str], uri: str):
        self.fields = fields
        shown = ", ".join(fields[:12]) + (" ..." if len(fields) > 12 else "")
        super().__init__(f"{stage}: {uri} holds outputs made with a different config; differing fields: {shown}. "
                         f"Use the same config to resume, another run.output, or --fresh to start this stage "
                         f"(and those after it) over")


class Worker(ABC):
    """Runs units of one stage inside one process; built once, reused for every unit it gets.

    A unit is done in two steps so that an executor can overlap them: `compute` (the accelerator's
    work, one unit at a time) and `commit` (writing outputs, which may run while the next unit computes).
    """

    @abstractmethod
    def compute(self, unit: Unit) -> Any:
        """Do the work of `unit`; return what `commit` needs (kept in this process)."""

    @abstractmethod
    def commit(self, unit: Unit, computed: Any) -> dict:
        """Write the outputs, manifest last; return a small summary ({'images': n, 'committed': bool})."""

    def run(self, unit: Unit) -> dict:
        return self.commit(unit, self.compute(unit))


class Stage(ABC):
    """A stage of one run: its units, its storage prefix, the config fields that determine its outputs."""

    kind: str = "stage"  # squeeze / recover / relabel / evaluate
    unit_noun: str = "shard"

    def __init__(self, cfg: Config, storage: Storage, context: RunContext):
        self.cfg, self.storage, self.context = cfg, storage, context

    @property
    @abstractmethod
    def prefix(self) -> str:
        """Storage prefix of this stage's outputs, e.g. 'recover/prism'."""

    @property
    def name(self) -> str:
        return self.prefix

    @property
    def store(self) -> ShardStore:
        return ShardStore(self.storage, self.prefix)

    @abstractmethod
    def units(self) -> list[Unit]:
        """Every unit of the stage, in a stable order."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """The resolved config values that determine this stage's outputs (compared on resume)."""

    @abstractmethod
    def open_worker(self) -> Worker:
        """Build a worker in the current process (called inside a Ray actor on a cluster)."""

    def images_per_unit(self, unit: Unit) -> int:
        return 0

    # ---- what the stage reads and writes, for the driver's checks before anything runs

    def teachers_read(self) -> list[str]:
        """Names of the teachers whose weights this stage's workers load."""
        return []

    def inputs(self) -> dict[str, str]:
        """Run keys this stage reads that an earlier stage writes -> what to do when one is missing."""
        return {}

    def outputs(self) -> list[str]:
        """Run keys a later stage may read, written once this stage is complete."""
        return [f"{self.prefix}/{COMBINED}"]

    def finalize(self) -> None:
        """Called once every unit is committed: write the stage's combined manifest."""
        self.store.write_combined()

    # ---- recorded config (resume safety)

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config.json"

    def _fingerprint_json(self) -> dict:
        return json.loads(json.dumps(self.fingerprint(), default=str))

    def refuse_changed_config(self) -> None:
        """Raise ConfigMismatch when committed outputs were made with another config; reads only."""
        if not self.storage.exists(self.config_key):
            return
        recorded, current = self.storage.read_json(self.config_key), self._fingerprint_json()
        if recorded != current and self.store.committed():  # nothing committed: the old record binds nothing
            raise ConfigMismatch(self.name, diff_fields(recorded, current), self.storage.uri(self.prefix))

    def check_config(self, fresh: bool = False) -> None:
        """Record this stage's config, or refuse when committed outputs were made with another one."""
        if fresh:
            self.storage.delete(self.prefix)
        else:
            self.refuse_changed_config()
        self.storage.write_json(self.config_key, self._fingerprint_json())


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def diff_fields(a: dict, b: dict) -> list[str]:
    """Dotted names of the fields whose values differ between two nested dicts."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<absent>") != fb.get(k, "<absent>"))
