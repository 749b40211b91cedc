"""Progress lines and the per-stage outcome that every executor returns."""
from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prism_ray.formatting import hms

if TYPE_CHECKING:
    from prism_ray.stages.base import Stage, Unit


@dataclass
class StageReport:
    stage: str
    total: int
    skipped: int = 0  # committed before this invocation started
    ran: int = 0  # committed by this invocation
    duplicates: int = 0  # finished again by a late attempt after another had committed (outputs unchanged)
    already: int = 0  # handed out again but found committed before any compute (not computed twice)
    failed: dict[str, str] = field(default_factory=dict)  # unit id -> last error
    attempts: int = 0
    workers_started: int = 0  # Ray executor: actors started (the first ones and every replacement)
    workers_lost: int = 0  # actors that died (killed, node lost, preempted) and were replaced
    requeued: int = 0  # units handed back to the queue because their worker was lost (no attempt counted)
    nodes_joined: int = 0  # nodes that joined the cluster while the stage ran
    nodes_left: int = 0  # nodes that left (removed, preempted) while the stage ran
    images: int = 0
    seconds: float = 0.0
    storage_retries: int = 0  # storage requests of this invocation's commits that failed and were retried
    worker_peak_rss: int = 0  # bytes: the largest peak RSS a worker process reported (0: none reported)
    driver_peak_rss: int = 0  # bytes: this driver process's peak RSS when the stage ended
    moved: int = 0  # units taken back from a busy worker before they began and given to an idle one
    # Ray executor: (what, time.time(), ...) for units sent, moved and workers ready and ended; not in to_json
    events: list = field(default_factory=list, repr=False)

    @property
    def complete(self) -> bool:
        return not self.failed and self.skipped + self.ran + self.duplicates + self.already == self.total

    def to_json(self) -> dict:
        return {"stage": self.stage, "total": self.total, "skipped": self.skipped, "ran": self.ran,
                "duplicates": self.duplicates, "already": self.already, "failed": self.failed, "attempts": self.attempts,
                "workers_started": self.workers_started, "workers_lost": self.workers_lost, "requeued": self.requeued,
                "nodes_joined": self.nodes_joined, "nodes_left": self.nodes_left, "images": self.images,
                "seconds": round(self.seconds, 3), "storage_retries": self.storage_retries,
                "worker_peak_rss": self.worker_peak_rss, "driver_peak_rss": self.driver_peak_rss,
                "moved": self.moved, "complete": self.complete}

    def cluster_line(self) -> str:
        """What the cluster did during the stage ('' when nothing happened worth a line)."""
        if not (self.workers_started or self.nodes_joined or self.nodes_left):
            return ""
        return (f"{self.nodes_joined} node(s) joined, {self.nodes_left} left; {self.workers_started} worker(s) "
                f"started, {self.workers_lost} lost; {self.requeued} unit(s) requeued")


class Progress:
    """One line per finished unit: done/total, images per second, ETA (to stderr, or silent)."""

    def __init__(self, stage: str, noun: str, total: int, already: int, quiet: bool = False, stream=None):
        self.stage, self.noun, self.total, self.already = stage, noun, total, already
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.done = 0
        self.images = 0
        self.failed = 0

    def start(self) -> None:
        todo = self.total - self.already
        self._print(f"{self.total} {self.noun}s, {self.already} already committed, {todo} to run")

    def unit_done(self, images: int = 0) -> None:
        self.done += 1
        self.images += images
        self._line()

    def unit_failed(self, unit_id: str, error: str) -> None:
        self.failed += 1
        self._print(f"{self.noun} {unit_id} failed for good: {error}")

    def retry(self, unit_id: str, attempt: int, error: str) -> None:
        self._print(f"{self.noun} {unit_id} attempt {attempt} failed, will retry: {error}")

    def note(self, text: str) -> None:
        self._print(text)

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.t0
        todo = self.total - self.already
        rate_units = self.done / elapsed if elapsed > 0 else 0.0
        eta = (todo - self.done - self.failed) / rate_units if rate_units > 0 else 0.0
        ips = f", {self.images / elapsed:.2f} images/s" if self.images else ""
        self._print(f"{self.already + self.done}/{self.total} {self.noun}s{ips}, elapsed {hms(elapsed)}, "
                    f"ETA {hms(eta)}")

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self.stage}] {text}", file=self.stream, flush=True)


def failure_kind(e: BaseException) -> str:
    """'storage' when a unit's outputs could not be written (its compute was fine), else 'compute'."""
    from prism_ray.storage import StorageError
    return "storage" if isinstance(e, StorageError) else "compute"


def describe_error(e: BaseException) -> str:
    """One line: the exception type and message, and where in our code it was raised."""
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if "prism_ray" in f.filename]
    where = f" (at {ours[-1].filename.rsplit('prism_ray/', 1)[-1]}:{ours[-1].lineno})" if ours else ""
    return f"{type(e).__name__}: {e}{where}"


class StageRun:
    """The bookkeeping every executor shares for one invocation of a stage: what is left to run, what
    finished or failed (recorded under the run), the progress lines, and the report at the end."""

    def __init__(self, stage: "Stage", quiet: bool = False):
        self.stage, self.store = stage, stage.store
        units = stage.units()
        committed = self.store.committed()
        self.todo: list[Unit] = [u for u in units if u.id not in committed]
        # failure records of earlier invocations: cleared when their unit commits this time
        self._stale_failures = self.store.failed_ids() & {u.id for u in self.todo}
        self.report = StageReport(stage.name, len(units), skipped=len(units) - len(self.todo))
        self.progress = Progress(stage.name, stage.unit_noun, len(units), self.report.skipped, quiet=quiet)
        self.progress.start()
        self._t0 = time.perf_counter()

    def attempt(self) -> None:
        self.report.attempts += 1

    def done(self, unit: "Unit", summary: dict) -> None:
        if summary.get("already_committed"):
            self.report.already += 1
        elif summary.get("committed", True):
            self.report.ran += 1
        else:
            self.report.duplicates += 1
        images = int(summary.get("images", 0))
        self.report.images += images
        self.report.storage_retries += int(summary.get("storage_retries", 0))
        self.report.worker_peak_rss = max(self.report.worker_peak_rss, int(summary.get("peak_rss", 0)))
        self.progress.unit_done(images)
        if unit.id in self._stale_failures:
            try:  # `failures()` hides a record whose unit is committed: one left behind does no harm
                self.store.storage.delete(self.store.failure_key(unit.id))
            except Exception as e:  # noqa: BLE001
                self.progress.note(f"could not delete the old failure record of {unit.id} ({e})")

    def raised(self, unit: "Unit", error: str, attempt: int, max_attempts: int, kind: str = "compute") -> bool:
        """A unit's code raised on its `attempt`-th try: True to retry, False once it is recorded failed.
        kind: 'compute' or 'storage' (see `failure_kind`), kept apart in the failure record and in status."""
        if attempt < max_attempts:
            self.progress.retry(unit.id, attempt, error)
            return True
        self.fail(unit, error, attempt, kind)
        return False

    def fail(self, unit: "Unit", error: str, attempts: int, kind: str = "compute") -> None:
        try:  # retried with backoff inside; a record that cannot be written must not stop the other units
            self.store.record_failure(unit.id, error, attempts, kind)
        except Exception as e:  # noqa: BLE001
            self.progress.note(f"could not write the failure record of {unit.id} ({e}); it is in this report")
        self.report.failed[unit.id] = error
        self.progress.unit_failed(unit.id, error)

    def finish(self) -> StageReport:
        self.report.seconds = time.perf_counter() - self._t0
        from prism_ray.memory import peak_rss_bytes
        self.report.driver_peak_rss = peak_rss_bytes()
        if self.report.complete:
            self.stage.finalize()
        return self.report
