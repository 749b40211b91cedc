"""The one dispatch loop: a stage's units over a pool of Ray actors, for every stage.

Each actor opens the stage's worker once (teachers, data) and keeps it. The driver keeps at most
`in_flight_per_worker` units queued per actor; an actor runs one unit's compute at a time while the
previous unit's upload finishes on another thread. A unit whose code raises is retried up to
`max_attempts` times, then recorded as failed while the others go on. A unit whose actor died (killed,
node lost) is requeued and the actor replaced. Only small summaries travel back to the driver: outputs
go from the actor straight to storage.
"""
from __future__ import annotations

import threading
import uuid
from collections import Counter, deque
from dataclasses import dataclass

import ray

from prism_ray.config import RayConfig
from prism_ray.orchestration.cluster import set_torch_threads
from prism_ray.orchestration.progress import Progress, StageReport, StageRun, describe_error, failure_kind
from prism_ray.stages.base import Stage, StageError, Unit

DEATHS_BEFORE_FAILING = 3  # a unit whose worker dies this often is failed rather than requeued forever


class StageActor:
    """Holds one stage worker; `run` may be called concurrently, computes are serialised."""

    def __init__(self, stage: Stage, cpus: float):
        set_torch_threads(cpus)
        self._compute_lock = threading.Lock()
        self.worker = stage.open_worker()

    def ready(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def run(self, unit: Unit) -> dict:
        with self._compute_lock:
            computed = self.worker.compute(unit)
        summary = self.worker.commit(unit, computed)
        summary["node"] = ray.get_runtime_context().get_node_id()
        return summary


@dataclass
class _Slot:
    actor: object
    generation: int
    in_flight: int = 0


def _unwrap(e: ray.exceptions.RayTaskError) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def run_stage_ray(stage: Stage, cfg: RayConfig, quiet: bool = False) -> StageReport:
    """Run every uncommitted unit of `stage` on Ray actors; return what happened."""
    run = StageRun(stage, quiet=quiet)
    report, progress = run.report, run.progress
    queue = deque(run.todo)
    if not queue:
        return run.finish()

    actor_cls = ray.remote(StageActor)
    actor_options = dict(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                         max_concurrency=cfg.in_flight_per_worker, max_restarts=0, max_task_retries=0,
                         scheduling_strategy="SPREAD", namespace=cfg.namespace)
    tag = uuid.uuid4().hex[:6]
    run_name = stage.cfg.run.name

    def start_actor(slot: int, generation: int):
        name = f"{run_name}/{stage.name}/worker-{slot}.{generation}/{tag}"
        return actor_cls.options(name=name, **actor_options).remote(stage, cfg.cpus_per_worker)

    n_workers = min(cfg.workers, len(queue))
    slots = {i: _Slot(start_actor(i, 0), 0) for i in range(n_workers)}
    _wait_ready(slots, cfg, progress)
    attempts: Counter = Counter()
    deaths: Counter = Counter()
    in_flight: dict = {}  # ObjectRef -> (slot id, generation, unit)

    try:
        while queue or in_flight:
            for sid, slot in slots.items():
                while queue and slot.in_flight < cfg.in_flight_per_worker:
                    unit = queue.popleft()
                    ref = slot.actor.run.remote(unit)
                    in_flight[ref] = (sid, slot.generation, unit)
                    slot.in_flight += 1
                    run.attempt()
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                sid, generation, unit = in_flight.pop(ref)
                slot = slots[sid]
                if slot.generation == generation:
                    slot.in_flight -= 1
                try:
                    summary = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the unit's own code raised
                    attempts[unit.id] += 1
                    cause = _unwrap(e)
                    if run.raised(unit, describe_error(cause), attempts[unit.id], cfg.max_attempts,
                                  kind=failure_kind(cause)):
                        queue.append(unit)
                    continue
                except ray.exceptions.RayError as e:  # the actor died under it: not the unit's fault
                    deaths[unit.id] += 1
                    if deaths[unit.id] >= max(DEATHS_BEFORE_FAILING, cfg.max_attempts):
                        run.fail(unit, f"worker died {deaths[unit.id]} times running it ({type(e).__name__})",
                             deaths[unit.id])
                    else:
                        queue.appendleft(unit)
                    if slot.generation == generation:  # replace the actor once, not once per lost unit
                        report.workers_lost += 1
                        progress.note(f"worker {sid} lost ({type(e).__name__}); starting a replacement, "
                                      f"requeueing its {stage.unit_noun}s")
                        _kill(slot.actor)
                        slots[sid] = _Slot(start_actor(sid, generation + 1), generation + 1)
                    continue
                run.done(unit, summary)
    finally:
        for slot in slots.values():
            _kill(slot.actor)
    return run.finish()


def _wait_ready(slots: dict, cfg: RayConfig, progress: Progress, note_every: float = 30.0) -> None:
    """Wait until every worker has loaded what it needs; say so while resources are missing, and fail fast,
    with the worker's own message, when workers cannot start at all (missing teachers, bad data...)."""
    refs = [slot.actor.ready.remote() for slot in slots.values()]
    pending = refs
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=note_every)
        try:
            ray.get(ready)
        except ray.exceptions.RayActorError as e:
            cause = getattr(e, "cause", None) or getattr(e, "error_msg", None) or e
            if isinstance(cause, ray.exceptions.RayTaskError):
                cause = _unwrap(cause)
            for slot in slots.values():
                _kill(slot.actor)
            msg = describe_error(cause) if isinstance(cause, BaseException) else str(cause)
            raise StageError(f"workers could not start: {msg}") from None
        if pending:
            free = ray.available_resources()
            progress.note(f"waiting for {len(pending)} of {len(refs)} workers to start (each needs "
                          f"{cfg.cpus_per_worker:g} CPU, {cfg.gpus_per_worker:g} GPU; free now: "
                          f"{free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU)")


def _kill(actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone is fine
        pass
