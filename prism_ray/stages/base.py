"""What a stage is, apart from where it runs: a list of units of work, and a worker that does one unit.

A stage plans its units (recover shards, teachers to train, label shards, student trainings); a worker,
opened once per process, loads what every unit needs (teachers, data) and runs units one at a time,
committing each unit's outputs through the stage's `ShardStore` itself. Executors (in-process, Ray)
only decide which units to hand to which worker, so that every stage shares one dispatch loop.
"""
from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional

import pyarrow as pa

from prism_ray.config import Config
from prism_ray.storage import (GENERATION, MANIFESTS, STAGE_RECORD, ShardStore, Storage, new_generation,
                               parquet_table, redact, retrying, sha256, write_stage_record)


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
                         f"and the stages after it over")


class Worker(ABC):
    """Runs units of one stage inside one process; built once, reused for every unit it gets.

    A unit is done in two steps so that an executor can overlap them: `compute` (the accelerator's
    work, one unit at a time) and `commit` (writing outputs, which may run while the next unit computes).
    """

    stage: "Stage"

    @abstractmethod
    def compute(self, unit: Unit) -> Any:
        """Do the work of `unit`; return what `commit` needs (kept in this process)."""

    @abstractmethod
    def commit(self, unit: Unit, computed: Any) -> dict:
        """Write the outputs, manifest last; return a small summary ({'images': n, 'committed': bool})."""

    def run(self, unit: Unit) -> dict:
        return self.skip_committed(unit) or self.commit(unit, self.compute(unit))

    def skip_committed(self, unit: Unit) -> dict | None:
        """A summary without any compute when `unit` is committed already (an attempt handed out again after its
        worker was lost once its manifest had landed, or a second driver's); None when it must run."""
        if self.stage.store.is_committed(unit.id):
            return {"images": 0, "committed": False, "already_committed": True}
        return None


class Stage(ABC):
    """A stage of one run: its units, its storage prefix, the config fields that determine its outputs, and the
    upstream stages whose outputs it reads (its lineage).

    The stage's record, ``<prefix>/stage.json``, holds the config it was made with, its generation (the folder
    ``<prefix>/<generation>/`` every output, manifest and checkpoint of it lives in) and the identity of each
    upstream output it consumed. A reset writes a record with a new generation first, then deletes the old
    folders: a reset interrupted at any point leaves nothing that could be adopted as committed.
    """

    kind: str = "stage"  # squeeze / recover / relabel / evaluate
    worker_kind: str | None = None  # which prism_ray.memory estimate its workers follow (None: light workers)
    unit_noun: str = "shard"
    kept: tuple[str, ...] = ()  # files beside the generations that a reset keeps (an imported set's source index)

    def __init__(self, cfg: Config, storage: Storage, context: RunContext):
        self.cfg, self.storage, self.context = cfg, storage, context
        self.generation: str | None = None  # set by `prepare` on the driver, carried to the workers
        self.upstream_identity: dict | None = None  # set by `bind` on the driver, carried to the workers

    @property
    @abstractmethod
    def prefix(self) -> str:
        """Storage prefix of this stage's outputs, e.g. 'recover/prism'."""

    @property
    def name(self) -> str:
        return self.prefix

    @property
    def store(self) -> ShardStore:
        return ShardStore(self.storage, self.prefix, generation=self.generation)

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

    # ---- what the stage reads, for the driver's checks before anything runs

    def teachers_read(self) -> list[str]:
        """Names of the teachers whose weights this stage's workers load."""
        return []

    def inputs(self) -> dict[str, str]:
        """Prefixes of the upstream stages whose outputs this stage reads -> what to do when one is not complete."""
        return {}

    def upstream(self) -> list[str]:
        return list(self.inputs())

    def check_source(self, fresh: bool = False) -> str | None:
        """Driver-side reading and checking of what the stage takes from outside the run, before anything is
        written (preflight); a line to show, or None."""
        return None

    def finalize(self) -> None:
        """Called once every unit is committed: sweep the files of attempts that never committed (and temporary
        files older than the run's lease), then write the stage's combined manifest (the stage is complete once it
        exists)."""
        store = self.store
        store.sweep_orphans(stale_temp_seconds=self.cfg.run.lease_seconds)
        store.write_combined()

    # ---- the record: config, generation, lineage

    def current_config(self) -> dict:
        """The fingerprint as it is recorded (JSON types, credentials in URIs redacted)."""
        return redact(json.loads(json.dumps(self.fingerprint(), default=str)))

    def record(self) -> dict | None:
        return ShardStore(self.storage, self.prefix).record()

    def config_change(self, record: dict | None = None) -> ConfigChange | None:
        """How the config differs from the recorded one (None: no record, or no difference). Reads only."""
        record = self.record() if record is None else record
        if not record or record.get("config") == self.current_config():
            return None
        return classify_change(record.get("config") or {}, self.current_config())

    def refuse_changed_config(self) -> ConfigChange | None:
        """Raise ConfigMismatch when committed outputs were made with another config, but for a raised IPC (a set
        grows); return the change. A changed config with nothing committed starts a new generation instead (what
        an interrupted stage left, checkpoints included, was made with the old config). Reads only."""
        self.refuse_legacy()
        record = self.record()
        change = self.config_change(record)
        if change is not None and (change.other or change.lowered) and \
                ShardStore(self.storage, self.prefix, generation=record["generation"]).committed():
            raise ConfigMismatch(self.name, change.describe(), self.storage.uri(self.prefix))
        return change

    def refuse_legacy(self) -> None:
        """Outputs of a prism-ray from before stage records (manifests straight under the prefix) are refused."""
        if self.record() is None and (self.storage.exists(f"{self.prefix}/config.json")
                                      or self.storage.list(f"{self.prefix}/{MANIFESTS}")):
            raise StageError(f"{self.name}: {self.storage.uri(self.prefix)} was written by an older prism-ray "
                             f"(no {STAGE_RECORD}); use another run.output, or --fresh to start this stage over")

    def prepare(self, fresh: bool = False) -> None:
        """Take up the stage's generation before it runs (the driver, under the run's lease): the recorded one to
        resume, or a new one for --fresh, a changed config with nothing committed, or a grown set (labels,
        students and diversity depend on whole sets; recover shards do not, so a recover keeps its shards and
        runs only the new IPC indices). Refuses what `refuse_changed_config` refuses, unless `fresh`."""
        if fresh:
            self.reset()
            return
        change = self.refuse_changed_config()
        record = self.record()
        if record is None:
            self.reset()
            return
        self.generation = record["generation"]
        if change is None:
            self._collect_garbage()
            return
        if change.is_growth and self.kind == "recover" and self.store.committed():
            # the combined manifest lists the smaller set: readers must wait for the grown one
            self.storage.delete(self.store.combined_key)
            self._write_record(upstream=record.get("upstream"))
            self._collect_garbage()
            return
        self.reset()

    def reset(self) -> None:
        """Start the stage over: a record with a new generation (the old outputs stop counting at once), then the
        old generations' folders are deleted."""
        self.generation = new_generation()
        self.upstream_identity = None
        self._write_record(upstream=None)
        self.on_reset()
        self._collect_garbage(everything=True)

    def on_reset(self) -> None:
        """What else a reset makes stale (the report, for the evaluate stages)."""

    def _write_record(self, upstream: dict | None) -> None:
        write_stage_record(self.storage, self.prefix, {
            "generation": self.generation, "config": self.current_config(), "upstream": upstream,
            "config_digest": digest(self.current_config()), "written": time.time()})

    def _collect_garbage(self, everything: bool = False) -> None:
        """Delete the folders of generations other than the current one (left by a reset that was interrupted)
        and, after a reset, whatever an older layout left under the prefix."""
        keep = {self.generation, STAGE_RECORD, "plan.json", "logs", *self.kept}
        for key in self.storage.list(self.prefix):
            name = key.rsplit("/", 1)[-1]
            if name in keep:
                continue
            if GENERATION.fullmatch(name) or everything:
                self.storage.delete(key)

    def bind(self) -> None:
        """Record the identity of every upstream output this stage is about to read (right before it runs, after
        the upstream stages of this invocation finished); refuse when committed outputs of this stage were made
        from other upstream outputs."""
        current = {u: identity(self.storage, u) for u in self.upstream()}
        record = self.record() or {}
        recorded = record.get("upstream")
        if recorded is not None and recorded != current and self.store.committed():
            changed = sorted(u for u in set(recorded) | set(current) if recorded.get(u) != current.get(u))
            raise StageError(stale_message(self, changed))
        self.upstream_identity = current
        if recorded != current:
            self._write_record(upstream=current)

    @property
    def lineage_digest(self) -> str:
        """What this stage's outputs derive from, as one digest: its config and its upstream identities."""
        return digest({"config": self.current_config(), "upstream": self.upstream_identity})


def stale_message(stage: Stage, changed: list[str]) -> str:
    return (f"{stage.name}: its committed outputs were made from other outputs of {', '.join(changed)} (made again "
            f"since); rerun it with --fresh (prism-ray {stage.kind} CONFIG --fresh) to make them again from the "
            f"current ones")


def digest(obj: Any) -> str:
    """A short, stable digest of a JSON-like value (canonical JSON, sha256, 16 hex digits)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:16]


def identity(storage: Storage, prefix: str) -> dict | None:
    """What a complete upstream stage's outputs are: its generation, config digest and combined manifest's sha256
    (None while it is not complete)."""
    store = ShardStore(storage, prefix)
    record = store.record()
    if not record or not store.complete():
        return None
    data = retrying(f"read {storage.uri(store.combined_key)}", lambda: storage.read_bytes(store.combined_key))
    return {"generation": record["generation"], "config": digest(record["config"]), "manifest": sha256(data)}


def read_upstream(storage: Storage, prefix: str, expected: dict | None = None) -> tuple[ShardStore, pa.Table]:
    """(store, combined manifest) of a complete upstream stage, as a worker reads it: when `expected` (the identity
    its driver bound, see `Stage.bind`) is given, the manifest must be exactly that one."""
    store = ShardStore(storage, prefix, generation=expected["generation"] if expected else None)
    if store.generation is None:
        raise StageError(f"{storage.uri(prefix)} has no {STAGE_RECORD}: run that stage first")
    try:
        data = retrying(f"read {storage.uri(store.combined_key)}", lambda: storage.read_bytes(store.combined_key))
    except FileNotFoundError:
        raise StageError(f"{storage.uri(prefix)} is not complete (no combined manifest in generation "
                         f"{store.generation}): run that stage first") from None
    if expected and sha256(data) != expected["manifest"]:
        raise StageError(f"{storage.uri(prefix)}: its combined manifest changed after this stage started; rerun "
                         f"this stage")
    return store, parquet_table(data)


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

    def describe(self, with_growth: bool = False) -> list[str]:
        """The differing fields for an error: a lowered IPC says so (a set can grow, not shrink). A raised IPC is
        listed beside other changes, or always with `with_growth`."""
        lowered = [f"{k} (lowered from {a} to {b}: a set can grow, not shrink)" for k, a, b in self.lowered]
        return lowered + self.other + [f"{k} (raised from {a} to {b})" for k, a, b in self.grown
                                       if self.other or self.lowered or with_growth]


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
