"""The driver's view of a run: which stages exist for a config, in what order, and running them.

A run lives under one URI and has one driver at a time (the run's lease, `lease.py`). At the start it records
the resolved config (secrets redacted) and the data facts every stage needs; each stage then records its own
config fingerprint, generation and plan, and, right before it runs, the upstream outputs it reads (its
lineage), so that `status` can report on a run from storage alone and a resume can refuse a changed config or
outputs made from other inputs.
"""
from __future__ import annotations

import sys
from typing import Callable

from prism_ray.config import STAGES, Config
from prism_ray.lease import RunLease
from prism_ray.orchestration.progress import StageReport
from prism_ray.preflight import preflight
from prism_ray.runs import context_for, data_context, open_storage, record_data, record_run, resolve_data
from prism_ray.stages.base import RunContext, Stage
from prism_ray.storage import Storage, retrying

__all__ = ["build_stages", "data_context", "execute", "open_storage", "record_run", "record_plan", "run_stages"]


def build_stages(cfg: Config, storage: Storage, context: RunContext, names: list[str] | None = None) -> list[Stage]:
    """The stages of `names` (default: run.stages), in pipeline order, one per unit family."""
    from prism_ray.stages.squeeze import SqueezeStage

    wanted = [s for s in STAGES if s in (names or cfg.run.stages)]
    stages: list[Stage] = []
    for kind in wanted:
        if kind == "squeeze":
            stages.append(SqueezeStage(cfg, storage, context))
        elif kind == "recover":
            from prism_ray.stages.imported import imported_stages
            from prism_ray.stages.recover import recover_stages
            stages.extend(recover_stages(cfg, storage, context) + imported_stages(cfg, storage, context))
        elif kind == "relabel":
            from prism_ray.stages.relabel import relabel_stages
            stages.extend(relabel_stages(cfg, storage, context))
        elif kind == "evaluate":
            from prism_ray.stages.evaluate import evaluate_stages
            stages.extend(evaluate_stages(cfg, storage, context))
    return stages


def record_plan(stage: Stage) -> None:
    units = stage.units()
    plan = {"stage": stage.name, "kind": stage.kind, "unit_noun": stage.unit_noun, "units": [u.id for u in units],
            "unit_images": {u.id: stage.images_per_unit(u) for u in units}}
    retrying(f"plan of {stage.name}", lambda: stage.storage.write_json(f"{stage.prefix}/plan.json", plan))


def downstream(stages: list[Stage], of: list[Stage]) -> list[Stage]:
    """The stages that read, directly or through others, the outputs of `of` (not `of` themselves)."""
    found: dict[str, Stage] = {}
    frontier = {s.prefix for s in of}
    while frontier:
        nxt = {s.prefix for s in stages if s.prefix not in found and s.prefix not in {o.prefix for o in of}
               and frontier & set(s.upstream())}
        for s in stages:
            if s.prefix in nxt:
                found[s.prefix] = s
        frontier = nxt
    return [s for s in stages if s.prefix in found]


Executor = Callable[[Stage], StageReport]


def run_stages(stages: list[Stage], executor: Executor, fresh: bool = False,
               on_report: Callable[[StageReport], None] | None = None,
               all_stages: list[Stage] | None = None, lease: RunLease | None = None) -> list[StageReport]:
    """Take up every stage's generation first (refusing before any work; with `fresh`, every stage of the config
    downstream of these is reset too, as its outputs were made from the ones being redone), then run them in
    order, each bound to the upstream outputs it reads right before it runs.

    A stage that does not complete stops the pipeline: later stages need all of its outputs.
    """
    for stage in stages:
        if lease is not None:
            lease.check()
        stage.prepare(fresh=fresh)
        record_plan(stage)
    if fresh:
        for stage in downstream(all_stages or stages, stages):
            stage.reset()
    reports = []
    for stage in stages:
        if lease is not None:
            lease.check()
        stage.bind()
        report = executor(stage)
        reports.append(report)
        if on_report:
            on_report(report)
        if not report.complete:
            break
    return reports


def execute(cfg: Config, stage_names: list[str], fresh: bool = False, local: bool = False,
            quiet: bool = False, take_over: bool = False, idle=None) -> list[StageReport]:
    """Everything `prism-ray run` / `prism-ray <stage>` does: check, take the run's lease, record, run on Ray or
    in-process, report. `idle`: workers kept by earlier runs of this process (a sweep's points), to take and
    leave workers in; by default the run keeps its own and ends them when it ends."""
    storage = open_storage(cfg)
    # The data is listed (once per run; never with data.index or a resumed run's index) and checked, then
    # everything else that can be checked from the config and storage: all before anything is written.
    data = resolve_data(cfg, storage)
    checked = context_for(cfg, data)
    stages = build_stages(cfg, storage, checked, stage_names)
    same = {s.prefix: s for s in stages}  # one object per stage: an imported set's source is indexed once
    all_stages = [same.get(s.prefix, s) for s in build_stages(cfg, storage, checked, list(STAGES))]
    notes = preflight(cfg, storage, checked, stages, fresh=fresh, all_stages=all_stages)
    if not quiet:
        for note in notes:
            print(note, file=sys.stderr, flush=True)
    say = None if quiet else (lambda text: print(f"[run] {text}", file=sys.stderr, flush=True))
    with RunLease.acquire(storage, cfg.run.lease_seconds, take_over=take_over, say=say) as lease:
        context = record_data(cfg, storage, data)  # the new index is written: workers read it from now on
        record_run(cfg, storage, context)
        for stage in all_stages:  # the checked stages run, their workers reading that index
            stage.context = context
        # Nothing left to run (a finished run, resumed): skip starting Ray, which costs seconds.
        pending = fresh or any({u.id for u in st.units()} - st.store.committed() for st in stages) \
            or any(not st.store.complete() for st in stages)
        run = lambda executor: run_stages(stages, executor, fresh=fresh, all_stages=all_stages,  # noqa: E731
                                          lease=lease)
        if local or not pending:
            from prism_ray.orchestration.local import run_stage_local
            reports = run(lambda st: run_stage_local(st, cfg.ray.max_attempts, quiet=quiet, lease=lease))
        else:
            from prism_ray.orchestration.cluster import ray_session
            from prism_ray.orchestration.dispatch import run_stage_ray
            from prism_ray.orchestration.ray_logs import run_log_path
            from prism_ray.orchestration.workers import IdleWorkers
            with ray_session(cfg.ray, log_path=run_log_path(cfg.run.output)):
                # a stage's workers go on to the next stage: no new processes to start
                kept = idle if idle is not None else IdleWorkers()
                try:
                    reports = run(lambda st: run_stage_ray(st, cfg.ray, quiet=quiet, lease=lease, idle=kept))
                finally:
                    if idle is None:
                        kept.close()
        if "evaluate" in stage_names and reports and all(r.complete for r in reports) and len(reports) == len(stages):
            from prism_ray.report import markdown, write_report
            lease.check()
            figures = write_report(storage)
            if not quiet:
                print(markdown(figures).split("## Samples")[0], file=sys.stderr, flush=True)
    return reports
