"""Run a stage's units one after another in this process: no Ray, same commit and retry rules."""
from __future__ import annotations

from prism_ray.orchestration.progress import StageReport, StageRun, describe_error, failure_kind
from prism_ray.stages.base import Stage


def run_stage_local(stage: Stage, max_attempts: int = 1, quiet: bool = False, lease=None) -> StageReport:
    run = StageRun(stage, quiet=quiet)
    worker = stage.open_worker() if run.todo else None
    for unit in run.todo:
        if lease is not None:
            lease.check()
        for attempt in range(1, max_attempts + 1):
            run.attempt()
            try:
                summary = worker.run(unit)
            except Exception as e:  # noqa: BLE001 - any failure of a unit is recorded, the rest go on
                if run.raised(unit, describe_error(e), attempt, max_attempts, kind=failure_kind(e)):
                    continue
                break
            run.done(unit, summary)
            break
    return run.finish()
