"""Milliseconds per synthesis step (forward + backward to the pixels) for teacher pools, on this machine.

Random-weight teachers: the cost does not depend on the weights. Usage: python bench/recover_step.py
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from prism_ray.algo.synthesize import ShardSpec, synthesize_shard  # noqa: E402
from prism_ray.algo.teachers import ModelShape, build_model, freeze  # noqa: E402
from prism_ray.config import RecoverConfig  # noqa: E402
from prism_ray.data.base import FASHION_MNIST_STATS, IMAGENET_STATS, Normalization  # noqa: E402

CASES = [
    ("28 px, 10 images", ModelShape(10, 1, 28), FASHION_MNIST_STATS, ["convnet"], 10, 50),
    ("28 px, 10 images", ModelShape(10, 1, 28), FASHION_MNIST_STATS, ["convnet", "shufflenet_v2_x0_5"], 10, 50),
    ("28 px, 10 images", ModelShape(10, 1, 28), FASHION_MNIST_STATS,
     ["convnet", "shufflenet_v2_x0_5", "mobilenet_v2_x0_5"], 10, 50),
    ("224 px, 10 images", ModelShape(1000, 3, 224), IMAGENET_STATS,
     ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"], 10, 3),
]


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for label, shape, stats, names, n, steps in CASES:
        torch.manual_seed(0)
        pool = {name: freeze(build_model(name, shape)).to(device) for name in names}
        cfg = RecoverConfig(primary=names[0], bn_pool=names[1:], selection="fixed", fixed=names[1:],
                            iterations=steps, schedule="flat", init="noise", jitter=2, crop_scale=[0.8, 1.0])
        spec = ShardSpec("bench", 0, tuple(range(n)), 0)
        norm = Normalization(stats[0] * (shape.in_channels // len(stats[0])), stats[1] * (shape.in_channels // len(stats[1])))
        chw = (shape.in_channels, shape.resolution, shape.resolution)
        synthesize_shard(pool, spec, RecoverConfig(**{**cfg.__dict__, "iterations": 1}), norm, device=device, shape=chw)
        t0 = time.perf_counter()
        synthesize_shard(pool, spec, cfg, norm, device=device, shape=chw)
        ms = 1000 * (time.perf_counter() - t0) / steps
        print(json.dumps({"case": label, "teachers": names, "device": str(device), "threads": torch.get_num_threads(),
                          "ms_per_step": round(ms, 1)}), flush=True)


if __name__ == "__main__":
    main()
