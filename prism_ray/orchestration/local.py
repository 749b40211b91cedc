"""Run a stage's units one after another in this process: no Ray, same commit and retry rules."""
from __future__ import annotations

import time
import traceback

from prism_ray.orchestration.progress import Progress, StageReport
from prism_ray.stages.base import Stage


def describe_error(e: BaseException) -> str:
    """One line: the exception type and message, and where in our code it was raised."""
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if "prism_ray" in f.filename]
    where = f" (at {ours[-1].filename.rsplit('prism_ray/', 1)[-1]}:{ours[-1].lineno})" if ours else ""
    return f"{type(e).__name__}: {e}{where}"


def run_stage_local(stage: Stage, max_attempts: int = 1, quiet: bool = False) -> StageReport:
    units = stage.units()
    store = stage.store
    committed = store.committed()
    todo = [u for u in units if u.id not in committed]
    report = StageReport(stage.name, len(units), skipped=len(units) - len(todo))
    progress = Progress(stage.name, stage.unit_noun, len(units), report.skipped, quiet=quiet)
    progress.start()
    t0 = time.perf_counter()
    worker = stage.open_worker() if todo else None
    for unit in todo:
        for attempt in range(1, max_attempts + 1):
            report.attempts += 1
            try:
                summary = worker.run(unit)
            except Exception as e:  # noqa: BLE001 - any failure of a unit is recorded, the rest go on
                error = describe_error(e)
                if attempt == max_attempts:
                    store.record_failure(unit.id, error, attempt)
                    report.failed[unit.id] = error
                    progress.unit_failed(unit.id, error)
                else:
                    progress.retry(unit.id, attempt, error)
                continue
            if summary.get("committed", True):
                report.ran += 1
            else:
                report.duplicates += 1
            report.images += int(summary.get("images", 0))
            progress.unit_done(int(summary.get("images", 0)))
            break
    report.seconds = time.perf_counter() - t0
    if report.complete:
        stage.finalize()
    return report
