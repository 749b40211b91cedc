"""The one dispatch loop: a stage's units over a pool of Ray actors, for every stage.

One `ray.wait` covers both unit results and workers becoming ready, so each worker gets units the moment
it is ready and a worker still waiting for room (or for the autoscaler) holds nobody back. Every few
seconds the loop looks at the cluster: it starts workers where there is room (`ray.workers: auto`) or
replaces lost ones, and counts the nodes that joined and left. Every ready worker gets one unit before any
gets a second; a second (up to `in_flight_per_worker`), whose compute overlaps the first one's upload,
goes only while the queue holds more units than the workers still starting will take. A worker that is idle
first takes back (`StageActor.withdraw`) a unit still waiting behind another worker's unit, then units from
the queue; idle workers end only when the queue is empty and no unit waits like that (in a run, an ended
worker is kept a few seconds for the next stage: `IdleWorkers`). So a unit sent ahead
never waits behind a long one while another worker could run it, and the tail of a stage keeps every worker
that has work. A unit whose code raises is retried up
to `max_attempts` times, then recorded as failed while the others go on. A unit whose worker died (killed,
node lost, preempted) is requeued without counting an attempt; only a unit whose worker dies repeatedly on
a live node is failed. A stop signal (see `stopping`) ends the workers and raises `Interrupted`. Only small
summaries travel back to the driver: outputs go from the actor straight to storage.
"""
from __future__ import annotations

import time
import uuid
from collections import Counter, deque

import ray

from prism_ray.config import RayConfig
from prism_ray.formatting import human_bytes
from prism_ray.memory import GiB, for_stage
from prism_ray.orchestration import stopping
from prism_ray.orchestration.metrics import StageMetrics
from prism_ray.orchestration.progress import StageReport, StageRun, describe_error, failure_kind
from prism_ray.orchestration.workers import ClusterWatch, IdleWorkers, Member, WorkerPool
from prism_ray.stages.base import Stage, StageError, Unit

DEATHS_BEFORE_FAILING = 3  # a unit whose worker dies this often on a live node is failed, not requeued forever
TICK_SECONDS = 1.0  # longest wait for a result: how soon a stop signal is acted on
WATCH_SECONDS = 2.0  # how often the cluster's nodes and free resources are read
NOTE_SECONDS = 30.0  # how often to say that workers are waiting for room
WITHDRAW_SECONDS = 30.0  # longest wait for a busy worker to answer whether a unit it holds has begun


def _unwrap(e: ray.exceptions.RayTaskError) -> BaseException:
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def check_room(stage: Stage, cfg: RayConfig) -> None:
    """Refuse to start when nodes of the worker's shape are connected but none has the memory one worker needs
    (a worker would die of memory mid-run). With no node of that shape yet, an autoscaler may add one: the
    workers wait for it instead."""
    need = for_stage(stage.cfg, stage.context.num_classes, stage.worker_kind)
    if need is None:
        return
    host = int(cfg.memory_per_worker * GiB) if cfg.memory_per_worker else need.host
    shaped = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= cfg.cpus_per_worker
              and n["Resources"].get("GPU", 0) >= cfg.gpus_per_worker]
    if not shaped:
        return
    room = {n["NodeManagerAddress"]: int(n["Resources"].get("memory", 0)) for n in shaped}
    if max(room.values()) >= host:
        return
    have = ", ".join(f"{addr} {human_bytes(m)}" for addr, m in sorted(room.items(), key=lambda kv: -kv[1])[:4])
    raise StageError(f"{stage.name}: no node can hold one worker: it needs about {human_bytes(host)} of host memory "
                     f"({need.holds}{'; ray.memory_per_worker' if cfg.memory_per_worker else ''}), the nodes with "
                     f"{cfg.cpus_per_worker:g} CPU and {cfg.gpus_per_worker:g} GPU free for Ray have {have}; use "
                     f"nodes with more memory, or lower what a worker holds (recover.class_group, "
                     f"evaluate.batch_size, evaluate.val_batch_size)")


def run_stage_ray(stage: Stage, cfg: RayConfig, quiet: bool = False, lease=None,
                  idle: IdleWorkers | None = None) -> StageReport:
    """Run every uncommitted unit of `stage` on Ray actors; return what happened. `lease`: the run's lease
    (`prism_ray.lease.RunLease`); the stage stops when another driver takes it over. `idle`: the run's kept
    workers; this stage takes its workers from there first, and leaves there those it ends."""
    run = StageRun(stage, quiet=quiet)
    report, progress = run.report, run.progress
    queue: deque[Unit] = deque(run.todo)
    if not queue:
        return run.finish()

    check_room(stage, cfg)
    pool = WorkerPool(stage, cfg, run, tag=uuid.uuid4().hex[:6], idle=idle)
    cluster = ClusterWatch(run)
    metrics = StageMetrics(stage.cfg.run.name, stage.name)
    in_flight: dict = {}  # ObjectRef -> (member, unit); unit None once withdrawn and sent elsewhere
    began: set = set()  # refs of units that shared their worker with another and are known to have begun
    sent_at: dict = {}  # ObjectRef -> when its unit was sent
    attempts: Counter = Counter()
    deaths: Counter = Counter()
    next_watch = next_note = 0.0
    lost = []  # workers lost since the last resize: replace them now rather than at the next watch

    def requeue(unit: Unit) -> None:
        queue.appendleft(unit)
        report.requeued += 1
        metrics.unit_requeued()

    def send(member: Member, unit: Unit) -> None:
        ref = member.actor.run.remote(unit, member.sent)
        member.sent += 1
        in_flight[ref] = (member, unit)
        member.held.append(ref)
        sent_at[ref] = time.monotonic()
        run.attempt()
        report.events.append(("sent", time.time(), unit.id, member.sid))

    def dispatch() -> None:
        ready = pool.ready()
        for member in ready:  # one unit per worker before a second to any
            if queue and not member.held:
                send(member, queue.popleft())
        for depth in range(2, cfg.in_flight_per_worker + 1):
            for member in ready:
                # a second unit only while there is more work than the workers still starting will take
                if len(queue) > len(pool.starting()) and member.in_flight < depth:
                    send(member, queue.popleft())

    def waiting() -> list:
        """(member, ref) of units that may still wait behind another unit of their worker, oldest first (a
        worker's units take its compute lock in no fixed order: any of them may be the one waiting)."""
        found = [(m, ref) for m in pool.members.values() if m.in_flight > 1 for ref in m.held if ref not in began]
        return sorted(found, key=lambda mr: sent_at[mr[1]])

    def steal() -> None:
        """Give each idle worker a unit that waits behind a busy worker's unit, before any unit of the queue:
        a second unit sent ahead to a worker never waits there while another worker could run it."""
        for idle in [m for m in pool.ready() if not m.held]:
            for donor, ref in waiting():
                unit = in_flight[ref][1]
                try:
                    taken = ray.get(donor.actor.withdraw.remote(unit.id), timeout=WITHDRAW_SECONDS)
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    taken = False  # its worker died or is stuck: the unit's own result will say what happened
                if not taken:
                    began.add(ref)
                    continue
                in_flight[ref] = (donor, None)  # its run returns {"withdrawn": True}: nothing to count
                donor.held.remove(ref)
                report.moved += 1
                report.events.append(("moved", time.time(), unit.id, donor.sid, idle.sid))
                send(idle, unit)
                break

    def finished(ref) -> None:
        member, unit = in_flight.pop(ref)
        if ref in member.held:
            member.held.remove(ref)
        began.discard(ref)
        sent_at.pop(ref, None)
        if unit is None:  # withdrawn and sent elsewhere
            return
        try:
            summary = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the unit's own code raised (or its commit gave up)
            attempts[unit.id] += 1
            cause = _unwrap(e)
            if run.raised(unit, describe_error(cause), attempts[unit.id], cfg.max_attempts, kind=failure_kind(cause)):
                queue.append(unit)
            else:
                metrics.unit_failed()
            return
        except ray.exceptions.RayError as e:  # its worker died under it: not the unit's fault
            node_lost = getattr(e, "preempted", False) or member.node_id not in cluster.poll()
            if not node_lost:
                deaths[unit.id] += 1
            if deaths[unit.id] >= max(DEATHS_BEFORE_FAILING, cfg.max_attempts):
                run.fail(unit, f"worker died {deaths[unit.id]} times running it ({type(e).__name__})", deaths[unit.id])
                metrics.unit_failed()
            else:
                requeue(unit)
            pool.lost(member, e)
            lost.append(member)
            return
        if summary.get("withdrawn"):  # taken back by an earlier driver step that then lost track: run it again
            requeue(unit)
            return
        run.done(unit, summary)
        metrics.unit_done(int(summary.get("images", 0)), summary.get("unit_seconds"))

    try:
        with stopping.polling():
            while queue or in_flight:
                signum = stopping.requested()
                if signum is not None:
                    raise stopping.Interrupted(signum, report, stage.unit_noun)
                if lease is not None:
                    lease.check()  # another driver took the run over: stop dispatching at once
                now = time.monotonic()
                if now >= next_watch:
                    cluster.poll()
                    pool.resize(len(queue))
                    next_watch = now + WATCH_SECONDS
                if (pool.starting() or not pool.members) and now >= next_note:
                    if next_note:  # not at the very start: workers take a moment to come up
                        progress.note(pool.waiting_note())
                    next_note = now + NOTE_SECONDS
                steal()
                dispatch()
                if not queue and not waiting():
                    pool.end_idle()
                metrics.state(len(in_flight), len(pool.ready()))
                starting = pool.starting()
                waitlist = list(in_flight) + list(starting)
                if not waitlist:  # nothing placed yet: wait for room (auto) without spinning
                    time.sleep(TICK_SECONDS)
                    continue
                done, rest = ray.wait(waitlist, num_returns=1, timeout=TICK_SECONDS)
                if done and rest:  # take everything else that is already back, in one go
                    more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                    done += more
                for ref in done:
                    if ref in starting:
                        member: Member = starting[ref]
                        if pool.owns(member) and not pool.started(member):
                            lost.append(member)
                    else:
                        finished(ref)
                if lost:
                    lost.clear()
                    next_watch = 0.0
        pool.settle_loads()
        pool.end_idle()  # every unit is back: the workers go to the run's next stage (or are ended)
        cluster.poll()  # a node that left after the last watch (its worker idle, no unit lost) still counts
    finally:
        pool.close()
        metrics.state(0, 0)
    return run.finish()
