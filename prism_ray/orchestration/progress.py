"""Progress lines and the per-stage outcome that every executor returns."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


@dataclass
class StageReport:
    stage: str
    total: int
    skipped: int = 0  # committed before this invocation started
    ran: int = 0  # committed by this invocation
    duplicates: int = 0  # finished again by a late attempt after another had committed (outputs unchanged)
    failed: dict[str, str] = field(default_factory=dict)  # unit id -> last error
    attempts: int = 0
    workers_lost: int = 0  # actors that died (killed, node lost) and were replaced
    images: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.failed and self.skipped + self.ran + self.duplicates == self.total

    def to_json(self) -> dict:
        return {"stage": self.stage, "total": self.total, "skipped": self.skipped, "ran": self.ran,
                "duplicates": self.duplicates, "failed": self.failed, "attempts": self.attempts,
                "workers_lost": self.workers_lost, "images": self.images, "seconds": round(self.seconds, 3), "complete": self.complete}


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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
        self._print(f"{self.already + self.done}/{self.total} {self.noun}s{ips}, elapsed {_hms(elapsed)}, "
                    f"ETA {_hms(eta)}")

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self.stage}] {text}", file=self.stream, flush=True)
