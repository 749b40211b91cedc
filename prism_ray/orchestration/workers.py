"""A stage's workers on Ray: actors that start wherever there is room, follow the cluster as nodes join and
leave, end when the queue drains, and are replaced when lost.

`StageActor` holds one stage worker (teachers, data) for every unit it runs. `WorkerPool` decides how many
there are: `ray.workers: N` keeps N (those that cannot be placed wait, and are demand an autoscaler sees);
`ray.workers: auto` keeps one per free slot of the worker's shape, up to `ray.max_workers` and the units
left, and asks the autoscaler (`request_resources`) for room for that many. `ClusterWatch` counts the
nodes that join and leave while a stage runs.
"""
from __future__ import annotations

import gc
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import ray

from prism_ray.config import RayConfig
from prism_ray.memory import peak_rss_bytes, release_freed_memory, reset_peak_rss
from prism_ray.orchestration.cluster import set_torch_threads
from prism_ray.orchestration.progress import StageRun, describe_error
from prism_ray.stages.base import Stage, StageError, Unit
from prism_ray.storage import RECORDS, ShardStore

FAKE_GPUS_ENV = "PRISM_RAY_FAKE_GPUS"  # tests: GPUs that are Ray resources only (ray.cluster_utils nodes)
START_DEATHS_BEFORE_FAILING = 10  # workers dying while starting (not their own error) before the stage gives up
WITHDRAWN_POLL_SECONDS = 0.5  # how soon a unit waiting for the compute lock notices it was taken back
IDLE_KEEP_SECONDS = 30.0  # how long a worker a stage no longer needs is kept for the run's next stage
LOAD_SETTLE_SECONDS = 5.0  # how long a stage's end waits for kept workers still loading it (a new process costs ~5 s)


def record_key(store: ShardStore, unit_id: str) -> str:
    """Where the worker that committed a unit records which node did it (and how long it took)."""
    return store.key(f"{RECORDS}/{unit_id}.json")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _this_node() -> dict:
    """This worker's node: its id, and the address it registered with (`ray start --node-ip-address`), which
    is what `ray status` and the operator know; `ray.util.get_node_ip_address()` in a worker gives the
    machine's first interface instead (192.0.2.2 for a node bound to 127.0.0.1)."""
    node_id = ray.get_runtime_context().get_node_id()
    registered = next((n.get("NodeManagerAddress") for n in ray.nodes() if n.get("NodeID") == node_id), None)
    return {"node_id": node_id, "node_ip": registered or ray.util.get_node_ip_address()}


def require_gpu(node: dict, gpus_per_worker: float) -> None:
    """A worker that reserved a GPU must see one: falling back to the CPU would hold the GPU idle for hours."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return
    raise StageError(
        f"node {node['node_ip']} ({node['node_id'][:12]}): this worker reserved {gpus_per_worker:g} GPU "
        f"(Ray GPU ids {ray.get_gpu_ids()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but "
        f"torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False, built for CUDA "
        f"{torch.version.cuda or 'none'}); install the NVIDIA driver and a CUDA build of torch on GPU nodes, or set "
        f"ray.gpus_per_worker: 0")


class StageActor:
    """Holds one stage worker. `run` may be called concurrently: computes are serialised, so one unit's upload
    overlaps the next unit's compute. A unit still waiting for the compute lock can be taken back (`withdraw`)
    and given to an idle worker. A start error is kept and reported by `ready` (not raised), so the driver
    gets it once, as one line, instead of Ray's forwarded traceback. `load` gives an idle actor the next
    stage's worker: its process, with torch and the project imported, outlives the stage (see `IdleWorkers`)."""

    def __init__(self, stage: Stage, name: str, cpus: float, gpus: float, check_gpu: bool):
        self.node = _this_node()
        self.gpus, self.check_gpu = gpus, check_gpu
        self._state = threading.Lock()  # guards the two sets below
        self._turns = threading.Condition()
        try:
            set_torch_threads(cpus)
        except Exception as e:  # noqa: BLE001 - reported by ready(), as a stage's own start error is
            self.stage, self.name, self.worker = stage, name, None
            self.start_error = {"error": one_line(describe_error(e)), "traceback": traceback.format_exc()}
            return
        self.load(stage, name)

    def load(self, stage: Stage, name: str) -> dict:
        """Drop the worker held now (its teachers, sets, CUDA memory) and build `stage`'s; what `ready` says.
        Called with no unit in flight here."""
        ran_before = getattr(self, "worker", None) is not None
        self.worker = None
        if ran_before:  # a stage ran here: free what it held (a new actor has nothing to free)
            gc.collect()
            release_freed_memory()
            reset_peak_rss()  # each stage's units report that stage's peak, not the process's
        self.stage, self.name = stage, name
        self.start_error: Optional[dict] = None
        # computes run one at a time, in the order the driver sent the units (a unit moved here from a busy worker
        # is not overtaken by one sent after it). Arrival cannot give that order: a threaded actor starts its
        # calls in no fixed order (a 0.5 s unit sent after a 3 s one ran first in one CI run), so each call
        # carries its turn, counted by the driver per worker and per stage.
        self._next_turn = 0  # the turn of the next unit allowed to compute (guarded by _turns)
        self._passed: set[int] = set()  # turns of units withdrawn before their turn came (guarded by _turns)
        self._computing = False
        self._started: set[str] = set()  # units that began computing here (never withdrawn after that)
        self._withdrawn: set[str] = set()  # units taken back before they began
        try:
            if self.check_gpu:
                require_gpu(self.node, self.gpus)
            self.worker = stage.open_worker()
        except Exception as e:  # noqa: BLE001 - any start failure is the stage's to report
            self.start_error = {"error": one_line(describe_error(e)), "traceback": traceback.format_exc()}
        return self.ready()

    def ready(self) -> dict:
        return {**self.node, **(self.start_error or {})}

    def withdraw(self, unit_id: str) -> bool:
        """Take back a unit sent here that has not begun computing: True when it will not run here."""
        with self._state:
            if unit_id in self._started:
                return False
            self._withdrawn.add(unit_id)
            return True

    def _begin(self, unit_id: str) -> bool:
        with self._state:
            if unit_id in self._withdrawn:
                self._withdrawn.discard(unit_id)
                return False
            self._started.add(unit_id)
            return True

    def _advance(self) -> None:
        """The next turn (under _turns), past those given up by withdrawn units."""
        self._next_turn += 1
        while self._next_turn in self._passed:
            self._passed.discard(self._next_turn)
            self._next_turn += 1

    def run(self, unit: Unit, turn: int) -> dict:
        """Compute and commit `unit` once the units sent before it (`turn`: 0, 1, ... in the order the driver
        sent them to this worker) have computed or were withdrawn."""
        t0 = time.perf_counter()
        with self._turns:
            while self._computing or self._next_turn != turn:
                self._turns.wait(timeout=WITHDRAWN_POLL_SECONDS)
                with self._state:
                    withdrawn = unit.id in self._withdrawn
                    self._withdrawn.discard(unit.id)
                if withdrawn:
                    if self._next_turn == turn:
                        self._advance()
                    else:
                        self._passed.add(turn)
                    self._turns.notify_all()
                    return {"withdrawn": True}
            self._advance()
            self._computing = True
        try:
            if not self._begin(unit.id):
                return {"withdrawn": True}
            started = time.time()
            skipped = self.worker.skip_committed(unit)  # its manifest landed before: never compute it again
            computed = None if skipped else self.worker.compute(unit)
            computed_at = time.time()
        finally:
            with self._turns:
                self._computing = False
                self._turns.notify_all()
        summary = skipped or self.worker.commit(unit, computed)
        seconds = time.perf_counter() - t0
        summary.update(self.node, unit_seconds=seconds, peak_rss=peak_rss_bytes(),  # what this worker held
                       worker=self.name, started=started, computed=computed_at)
        if summary.get("committed", True):
            try:  # informational: a unit stays committed even if its record cannot be written
                self.stage.storage.write_json(record_key(self.stage.store, unit.id), {
                    "unit": unit.id, **self.node, "worker": self.name, "pid": os.getpid(), "seconds": round(seconds, 3),
                    "started": started, "computed": computed_at, "finished": time.time()})
            except Exception as e:  # noqa: BLE001
                summary["record_error"] = one_line(describe_error(e))
        return summary


@dataclass
class Member:
    """One worker of the pool: its actor, and once it is ready, where it runs."""

    sid: int
    name: str
    actor: Any
    ready_ref: Any  # ObjectRef of `ready()` until the worker is ready, then None
    node_id: Optional[str] = None
    node_ip: Optional[str] = None
    held: list = field(default_factory=list)  # ObjectRefs of its units in flight, in the order they were sent
    sent: int = 0  # units sent to it so far: the next one's turn (StageActor.run)
    kept: bool = False  # taken from the run's kept workers: ready_ref is its `load` of this stage

    @property
    def in_flight(self) -> int:
        return len(self.held)


def alive_nodes() -> dict[str, str]:
    """Node id -> address of every live node."""
    return {n["NodeID"]: n.get("NodeManagerAddress", "") for n in ray.nodes() if n.get("Alive")}


def free_slots(shape: dict[str, float]) -> int:
    """How many more workers of `shape` fit on the live nodes now (per node: a worker cannot span nodes)."""
    try:
        from ray._private.state import available_resources_per_node  # DeveloperAPI, no public equivalent yet
        per_node = available_resources_per_node()
    except Exception:  # noqa: BLE001 - fall back to the cluster as one node
        per_node = {"cluster": ray.available_resources()}
    return sum(min(int(free.get(k, 0.0) / v + 1e-9) for k, v in shape.items()) for free in per_node.values())


class ClusterWatch:
    """Which nodes joined and left while a stage ran (for the progress lines and the stage report)."""

    def __init__(self, run: StageRun):
        self.run = run
        self.alive = alive_nodes()
        self.initial, self.ever = set(self.alive), set(self.alive)

    def poll(self) -> dict[str, str]:
        now = alive_nodes()
        for node in sorted(set(now) - self.ever):
            self.run.progress.note(f"node {now[node]} ({node[:8]}) joined; {len(now)} alive")
        for node in sorted(set(self.alive) - set(now)):
            self.run.progress.note(f"node {self.alive[node]} ({node[:8]}) left; {len(now)} alive")
        self.ever |= set(now)
        self.alive = now
        self.run.report.nodes_joined = len(self.ever - self.initial)
        self.run.report.nodes_left = len(self.ever - set(now))
        return now


class IdleWorkers:
    """Workers the run's stages no longer need, kept for its next stage: a worker ended at a stage's tail goes
    here instead of being killed, and the next stage's pool takes it (`StageActor.load`) before starting an
    actor. A fresh actor costs a process that imports torch and the project (~4.5 s of a toy stage's 5 s on a
    2-core machine); a kept one costs only the stage's own worker. One kept longer than `keep_seconds`
    is killed, so an idle worker holds its node's CPUs, GPU and memory for seconds, never through a long tail
    (an autoscaler can take the node back). Only actors of one shape (the run's `ray` section) are kept."""

    def __init__(self, keep_seconds: float = IDLE_KEEP_SECONDS):
        self.keep_seconds = keep_seconds
        self._kept: list[tuple[float, Any, dict]] = []  # (when kept, actor, its options), oldest first

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, actor, options: dict) -> None:
        self._kept.append((time.monotonic(), actor, options))

    def take(self, options: dict):
        """An idle actor started with `options`, or None."""
        self.expire()
        for i, (_, actor, opts) in enumerate(self._kept):
            if opts == options:
                del self._kept[i]
                return actor
        return None

    def count(self, options: dict) -> int:
        return sum(1 for _, _, opts in self._kept if opts == options)

    def expire(self) -> None:
        now = time.monotonic()
        for entry in [e for e in self._kept if now - e[0] > self.keep_seconds]:
            self._kept.remove(entry)
            _kill(entry[1])

    def close(self) -> None:
        for _, actor, _ in self._kept:
            _kill(actor)
        self._kept.clear()


class WorkerPool:
    """The stage's workers: started, ready (with the node they run on), ended, lost."""

    def __init__(self, stage: Stage, cfg: RayConfig, run: StageRun, tag: str, idle: Optional[IdleWorkers] = None):
        self.stage, self.cfg, self.run, self.tag, self.idle = stage, cfg, run, tag, idle
        self.members: dict[int, Member] = {}
        self.auto = cfg.workers == "auto"
        self.shape = cfg.worker_shape()
        self.check_gpu = cfg.gpus_per_worker > 0 and os.environ.get(FAKE_GPUS_ENV) != "1"
        self._next_sid = 0
        self._requested: Optional[int] = None  # workers' worth of resources asked of the autoscaler
        self._start_deaths = 0
        # one thread per unit in flight, and one for `withdraw` while they all wait
        self._options = dict(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                             max_concurrency=cfg.in_flight_per_worker + 1, max_restarts=0, max_task_retries=0,
                             scheduling_strategy="SPREAD", namespace=cfg.namespace)
        if cfg.memory_per_worker:
            self._options["memory"] = int(cfg.memory_per_worker * 2**30)
        self._actor_cls = ray.remote(StageActor)

    # ---- views

    def ready(self) -> list[Member]:
        return [m for m in self.members.values() if m.ready_ref is None]

    def starting(self) -> dict:
        """ObjectRef of `ready()` -> member, for the workers not ready yet."""
        return {m.ready_ref: m for m in self.members.values() if m.ready_ref is not None}

    def owns(self, member: Member) -> bool:
        return self.members.get(member.sid) is member

    def shape_text(self) -> str:
        return ", ".join(f"{v / 2**30:g} GiB memory" if k == "memory" else f"{v:g} {k}" for k, v in self.shape.items())

    # ---- size

    def resize(self, queued: int) -> None:
        """Start workers up to the target: the fixed count, or (auto) the free slots, never more than there is work
        for (the workers busy now plus one per queued unit: an idle worker would only be ended again)."""
        busy = sum(1 for m in self.members.values() if m.in_flight)
        work = busy + queued
        if self.auto:
            cap = work if self.cfg.max_workers is None else min(self.cfg.max_workers, work)
            self._ask_autoscaler(cap)
            # Workers still starting may not hold their resources yet: count them against the free slots.
            room = max(0, free_slots(self.shape) - len(self.starting())) + self._idle_count()
            want = min(cap - len(self.members), room)
        else:
            want = min(self.cfg.workers, work) - len(self.members)
        for _ in range(max(0, want)):
            self._start()

    def _idle_count(self) -> int:
        return self.idle.count(self._options) if self.idle is not None else 0

    def _start(self) -> Member:
        """A worker for this stage: an idle one the run kept (its Ray name stays the one of the stage it started
        for), else a new actor."""
        sid = self._next_sid
        self._next_sid += 1
        name = f"{self.stage.cfg.run.name}/{self.stage.name}/worker-{sid}/{self.tag}"
        actor = self.idle.take(self._options) if self.idle is not None else None
        if actor is not None:
            member = Member(sid, name, actor, actor.load.remote(self.stage, name), kept=True)
        else:
            actor = self._actor_cls.options(name=name, **self._options).remote(
                self.stage, name, self.cfg.cpus_per_worker, self.cfg.gpus_per_worker, self.check_gpu)
            member = Member(sid, name, actor, actor.ready.remote())
        self.members[sid] = member
        self.run.report.workers_started += 1
        return member

    def _ask_autoscaler(self, workers: int) -> None:
        if workers == self._requested:
            return
        from prism_ray.orchestration import autoscaler
        try:
            autoscaler.request([dict(self.shape) for _ in range(workers)])
        except Exception as e:  # noqa: BLE001 - a hint to the autoscaler; the run goes on without it
            self.run.progress.note(f"could not ask the autoscaler for room ({one_line(e)}); using the nodes there are")
        self._requested = workers

    # ---- events

    def started(self, member: Member) -> bool:
        """`member`'s ready() came back: True when it is ready. Its own start error fails the stage with one line
        (the traceback goes to a log in the run); a worker lost while starting is replaced later."""
        try:
            info = ray.get(member.ready_ref)
        except ray.exceptions.RayActorError as e:
            if e.actor_init_failed:  # the actor could not even be built there (e.g. prism_ray not installed)
                self._fail_start({"node_ip": None, "node_id": None, "error": one_line(_cause(e)),
                                  "traceback": str(e)})
            self._start_deaths += 1
            self._drop(member)
            if self._start_deaths >= START_DEATHS_BEFORE_FAILING:
                raise StageError(f"{self.stage.name}: {self._start_deaths} workers died while starting, none of "
                                 f"them by its own error (last: {one_line(_cause(e))[:300]}); check the nodes "
                                 f"(`ray status`, memory)") from None
            return False
        if info.get("error"):
            self._fail_start(info)
        self._mark_ready(member, info)
        self.run.report.events.append(("ready", time.time(), member.sid))
        self._start_deaths = 0
        waiting = len(self.starting())
        self.run.progress.note(f"worker {member.sid} ready on {member.node_ip} ({member.node_id[:8]}); "
                               f"{len(self.ready())} ready" + (f", {waiting} waiting for room" if waiting else ""))
        return True

    def _fail_start(self, info: dict) -> None:
        key = f"{self.stage.prefix}/logs/worker-start.txt"
        where = ""
        try:
            self.stage.storage.write_bytes(key, (
                f"stage {self.stage.name}, worker on node {info['node_ip']} ({info['node_id']}), "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n{info['error']}\n\n{info['traceback']}").encode())
            where = f" (traceback: {self.stage.storage.uri(key)})"
        except Exception as e:  # noqa: BLE001 - the error itself matters more than its log
            where = f" (traceback not saved: {one_line(e)[:200]})"
        self.close()
        on = f" on node {info['node_ip']}" if info["node_ip"] else ""
        raise StageError(f"{self.stage.name}: a worker could not start{on}: {info['error']}{where}")

    def lost(self, member: Member, error: BaseException) -> None:
        """A worker died under its units (killed, node lost, preempted): drop it; `resize` starts another."""
        if not self.owns(member):
            return  # already dropped, by an earlier unit of the same worker
        self.run.report.workers_lost += 1
        self.run.progress.note(f"worker {member.sid} on {member.node_ip} lost ({type(error).__name__}); "
                               f"requeueing its {self.stage.unit_noun}s")
        self._drop(member)

    def end_idle(self) -> None:
        """The queue is empty and no unit waits behind a busy worker: end every worker with nothing in flight
        (ready or still waiting for room). A kept worker still loading this stage is left to finish loading and
        kept then: killed, it would cost the next stage a new process."""
        for member in list(self.members.values()):
            if member.in_flight:
                continue
            if self.idle is not None and member.ready_ref is not None and member.kept:
                continue
            self.run.report.events.append(("ended", time.time(), member.sid))
            if self.idle is not None and member.ready_ref is None:  # a ready worker: kept for the next stage
                self.members.pop(member.sid, None)
                self.idle.keep(member.actor, self._options)
            else:
                self._drop(member)
        if self.idle is not None:
            self.idle.expire()

    def settle_loads(self) -> None:
        """Every unit is back: wait up to LOAD_SETTLE_SECONDS for kept workers still loading this stage, so that
        `end_idle` keeps them. One whose load failed or is not done by then stays loading: `close` ends it."""
        loading = {m.ready_ref: m for m in self.members.values() if m.kept and m.ready_ref is not None}
        if not loading:
            return
        done, _ = ray.wait(list(loading), num_returns=len(loading), timeout=LOAD_SETTLE_SECONDS)
        for ref in done:
            try:
                info = ray.get(ref)
            except ray.exceptions.RayActorError:
                continue
            if not info.get("error"):
                self._mark_ready(loading[ref], info)

    @staticmethod
    def _mark_ready(member: Member, info: dict) -> None:
        member.ready_ref, member.node_id, member.node_ip = None, info["node_id"], info["node_ip"]

    def _drop(self, member: Member) -> None:
        self.members.pop(member.sid, None)
        _kill(member.actor)

    def close(self) -> None:
        for member in list(self.members.values()):
            self._drop(member)
        if self._requested:
            self._ask_autoscaler(0)  # let the cluster scale back down

    def waiting_note(self) -> str:
        free = ray.available_resources()
        have = ", ".join(f"{free.get(k, 0) / (2**30 if k == 'memory' else 1):g} {k}" for k in self.shape)
        ready, starting = len(self.ready()), len(self.starting())
        if self.auto and not self.members:
            return (f"no room for a worker (each needs {self.shape_text()}; free now: {have}); asked the autoscaler "
                    f"for {self._requested or 0}, waiting for nodes")
        return (f"{starting} of {ready + starting} workers waiting for room (each needs {self.shape_text()}; free "
                f"now: {have})")


def _cause(e: BaseException) -> str:
    """The last line of a Ray error: for an exception raised remotely, the exception itself."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone is fine
        pass
