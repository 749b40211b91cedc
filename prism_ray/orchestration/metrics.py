"""Stage progress as Ray metrics, so the Ray dashboard and Prometheus show every run on a cluster.

Exported by the driver through Ray's metrics agent as `ray_prism_<name>` with tags `run` and `stage`:
units committed / failed / requeued (counters), units in flight and workers ready (gauges), images
committed (counter) and seconds per unit (histogram of each unit's compute plus commit, timed by its worker).
"""
from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

TAGS = ("run", "stage")
SECONDS_BOUNDARIES = [0.1, 1, 5, 15, 60, 300, 900, 3600]


def _metrics() -> dict:
    """The metrics, registered with Ray's recorder of this session (same names for every stage: tags differ)."""
    return {
        "committed": Counter("prism_units_committed", "units committed", tag_keys=TAGS),
        "failed": Counter("prism_units_failed", "units failed for good", tag_keys=TAGS),
        "requeued": Counter("prism_units_requeued", "units requeued after their worker was lost", tag_keys=TAGS),
        "images": Counter("prism_images_committed", "images committed", tag_keys=TAGS),
        "in_flight": Gauge("prism_units_in_flight", "units handed to workers and not yet back", tag_keys=TAGS),
        "workers": Gauge("prism_workers_ready", "workers ready to take units", tag_keys=TAGS),
        "seconds": Histogram("prism_unit_seconds", "seconds per unit (compute and commit)",
                             boundaries=SECONDS_BOUNDARIES, tag_keys=TAGS),
    }


class StageMetrics:
    """The metrics of one stage of one run; every update is a cheap local call."""

    def __init__(self, run: str, stage: str):
        self.tags = {"run": run, "stage": stage}
        self._m = _metrics()

    def unit_done(self, images: int, seconds: float | None) -> None:
        self._m["committed"].inc(1, tags=self.tags)
        if images:
            self._m["images"].inc(images, tags=self.tags)
        if seconds is not None:
            self._m["seconds"].observe(seconds, tags=self.tags)

    def unit_failed(self) -> None:
        self._m["failed"].inc(1, tags=self.tags)

    def unit_requeued(self) -> None:
        self._m["requeued"].inc(1, tags=self.tags)

    def state(self, in_flight: int, workers: int) -> None:
        self._m["in_flight"].set(in_flight, tags=self.tags)
        self._m["workers"].set(workers, tags=self.tags)
