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
    worker_kind: str | None = None  # which prism_ray.memory estimate its workers follow (None: light workers)
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

    def prepare(self, fresh: bool = False) -> str | None:
        """Driver-side reading and checking before any unit runs (writes nothing); a line to show, or None."""
        return None

    def finalize(self) -> None:
        """Called once every unit is committed: write the stage's combined manifest."""
        self.store.write_combined()

    # ---- recorded config (resume safety)

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config.json"

    def current_config(self) -> dict:
        """The fingerprint as it is recorded (JSON types)."""
        return json.loads(json.dumps(self.fingerprint(), default=str))

    def config_change(self) -> ConfigChange | None:
        """How the config differs from the one the committed outputs were made with (None: no difference, or
        nothing committed yet, so the old record binds nothing). Reads only."""
        if not self.storage.exists(self.config_key):
            return None
        recorded, current = self.storage.read_json(self.config_key), self.current_config()
        if recorded == current or not self.store.committed():
            return None
        return classify_change(recorded, current)

    def refuse_changed_config(self) -> ConfigChange | None:
        """Raise ConfigMismatch for any change but a raised IPC (a set grows); return the change. Reads only."""
        change = self.config_change()
        if change is not None and (change.other or change.lowered):
            raise ConfigMismatch(self.name, change.describe(), self.storage.uri(self.prefix))
        return change

    def check_config(self, fresh: bool = False) -> None:
        """Record this stage's config, or refuse when committed outputs were made with another one.

        One change is not refused: raising the IPC (a set grows). A recover shard depends on its IPC index,
        class group, teachers and recover settings, not on the total IPC, so recover stages keep every
        committed shard and run only the new IPC indices; later stages depend on whole sets and start over.
        """
        if fresh:
            self.storage.delete(self.prefix)
        elif self.refuse_changed_config() is not None:  # the IPC grew
            if self.kind == "recover":
                # the combined manifest lists the smaller set: readers must wait for the grown one
                self.storage.delete(f"{self.prefix}/{COMBINED}")
            else:
                # labels, students and diversity were made for the smaller sets: redo them
                self.storage.delete(self.prefix)
        self.storage.write_json(self.config_key, self.current_config())


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


@dataclass
class ConfigChange:
    """How a stage's recorded fingerprint differs from the current one: IPC fields raised or lowered
    (a field named 'ipc', e.g. recover.ipc), and every other differing field."""

    grown: list[tuple[str, Any, Any]]
    lowered: list[tuple[str, Any, Any]]
    other: list[str]

    @property
    def is_growth(self) -> bool:
        return bool(self.grown) and not self.lowered and not self.other

    def describe(self) -> list[str]:
        """The differing fields for an error: a lowered IPC says so (a set can grow, not shrink)."""
        lowered = [f"{k} (lowered from {a} to {b}: a set can grow, not shrink)" for k, a, b in self.lowered]
        return lowered + self.other + [f"{k} (raised from {a} to {b})" for k, a, b in self.grown
                                       if self.other or self.lowered]


def classify_change(recorded: dict, current: dict) -> ConfigChange:
    fa, fb = flatten(recorded), flatten(current)
    grown, lowered, other = [], [], []
    for k in diff_fields(recorded, current):
        a, b = fa.get(k), fb.get(k)
        if k.rsplit(".", 1)[-1] == "ipc" and isinstance(a, int) and isinstance(b, int):
            (grown if b > a else lowered).append((k, a, b))
        else:
            other.append(k)
    return ConfigChange(grown, lowered, other)


def diff_fields(a: dict, b: dict) -> list[str]:
    """Dotted names of the fields whose values differ between two nested dicts."""
    fa, fb = flatten(a), flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k, "<absent>") != fb.get(k, "<absent>"))
