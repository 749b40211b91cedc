"""Shards per second the dispatch loop sustains when shards are trivial (1 image, 1 iteration, tiny teacher).

Measures the orchestration overhead: Ray task round trips, the worker's commit (image + manifest writes),
the driver's bookkeeping. Usage: python bench/dispatch_throughput.py [--shards 200]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Ray swaps 127.0.0.1 for the interface address unless told not to (RAY_NOTES.md); read at import time
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

from prism_ray import pipeline  # noqa: E402
from prism_ray.config_loader import config_from_dict  # noqa: E402
from prism_ray.orchestration.dispatch import run_stage_ray  # noqa: E402


def trivial_config(output: str, shards: int, workers: int, in_flight: int):
    return config_from_dict({
        "run": {"name": "bench", "output": output, "stages": ["recover"]},
        "data": {"classes": 1, "max_per_class": shards},
        "teachers": {"models": [{"name": "t", "arch": "convnet", "weights": "random"}]},
        "recover": {"primary": "t", "ipc": shards, "class_group": 1, "iterations": 1, "schedule": "flat",
                    "jitter": 0, "image_format": "png"},
        "baselines": {"random_real": False},
        "ray": {"workers": workers, "cpus_per_worker": 0.5, "in_flight_per_worker": in_flight},
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=200)
    args = ap.parse_args()
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             log_to_driver=False)
    results = []
    for workers, in_flight in [(1, 1), (1, 2), (2, 2), (2, 4)]:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = trivial_config(tmp, args.shards, workers, in_flight)
            storage = pipeline.open_storage(cfg)
            context = pipeline.data_context(cfg)
            (stage,) = pipeline.build_stages(cfg, storage, context, ["recover"])
            stage.prepare()
            t0 = time.perf_counter()
            report = run_stage_ray(stage, cfg.ray, quiet=True)
            wall = time.perf_counter() - t0
            assert report.complete and report.ran == args.shards
            results.append({"workers": workers, "in_flight_per_worker": in_flight, "shards": args.shards,
                            "seconds": round(wall, 2), "shards_per_second": round(args.shards / wall, 1)})
            print(json.dumps(results[-1]), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
