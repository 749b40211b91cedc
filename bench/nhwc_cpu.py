"""NCHW against NHWC (channels_last) on this machine's CPU, at the demo's shapes: what the layout saves in each
stage that trains or runs convolutions. Random weights and images (the cost does not depend on them).

    .venv/bin/python bench/nhwc_cpu.py [--threads 1] [--repeats 2] [--out PATH]

- squeeze: `train_classifier`, one epoch of --images (1,280) images 1x28x28 at batch 128 (SGD), per teacher arch;
- recover: one synthesis step (`synthesize_shard`, 10 images 28 px, the demo's PRISM config: primary ConvNet,
  BN pool MobileNetV2 x0.5 + ShuffleNetV2 x0.5, 3 slots at p 0.5), ms per step over --steps steps;
- students: 20 epochs of `train_student` (100 images, batch 50, the demo's `prism` recipe) per student arch;
- scoring: `evaluate_classifier` on 2,000 images at batch 500.

Each variant runs --repeats times, alternating layouts, and the best time counts (a shared machine's noise only
ever adds). Prints a Markdown table and writes bench/results/nhwc_cpu.json (or --out).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from _common import ROOT, default_out, machine, table, write_json

import torch  # noqa: E402

from prism_ray.algo.soft_labels import dense_labels, plan_epoch, soft_labels  # noqa: E402
from prism_ray.algo.student import build_student, train_student  # noqa: E402
from prism_ray.algo.synthesize import ShardSpec, TeacherSet, synthesize_shard  # noqa: E402
from prism_ray.algo.teachers import ModelShape, build_model, freeze  # noqa: E402
from prism_ray.algo.train import evaluate_classifier, train_classifier  # noqa: E402
from prism_ray.config_loader import load_config  # noqa: E402
from prism_ray.data.base import FASHION_MNIST_STATS, Normalization  # noqa: E402

SHAPE = ModelShape(10, 1, 28)
DEMO = ROOT / "jobs" / "configs" / "fmnist-demo.yaml"


def best_of(repeats: int, fn) -> dict[bool, float]:
    """Seconds of fn(channels_last) for both layouts, the best of `repeats` alternating runs."""
    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):
        for cl in (False, True):
            t0 = time.perf_counter()
            fn(cl)
            best[cl] = min(best[cl], time.perf_counter() - t0)
    return best


def squeeze(arch: str, images: int):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(images, 1, 28, 28, generator=g), torch.randint(0, 10, (images,), generator=g)
    return lambda cl: train_classifier(build_model(arch, SHAPE, seed=0), (x, y), epochs=1, batch_size=128,
                                       lr=0.05, channels_last=cl)


def recover(steps: int):
    cfg = dataclasses.replace(load_config(str(DEMO)).recover, iterations=steps)
    pool = {"convnet": build_model("convnet", SHAPE, seed=0),
            "mobilenet_v2": build_model("mobilenet_v2_x0_5", SHAPE, seed=1),
            "shufflenet_v2": build_model("shufflenet_v2_x0_5", SHAPE, seed=2)}
    init = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    spec = ShardSpec(shard_id="bench", class_ids=list(range(10)), ipc_index=0, seed=5)

    def run(cl: bool) -> None:
        for m in pool.values():  # the TeacherSet converts in place: start each run from NCHW
            m.to(memory_format=torch.contiguous_format)
        teachers = TeacherSet(pool, "cpu", channels_last=cl, first_bn_multiplier=cfg.first_bn_multiplier)
        try:
            synthesize_shard(teachers, spec, dataclasses.replace(cfg, channels_last=cl), Normalization(*FASHION_MNIST_STATS),
                             init_images=init if cfg.init == "real" else None, shape=(1, 28, 28))
        finally:
            teachers.close()
    return run


def students(arch: str, epochs: int):
    cfg = dataclasses.replace(load_config(str(DEMO)).evaluate, epochs=epochs)
    g = torch.Generator().manual_seed(2)
    images, targets = torch.randn(100, 1, 28, 28, generator=g), torch.randint(0, 10, (100,), generator=g)
    teacher = freeze(build_model("convnet", SHAPE, seed=3))
    labels = {}
    for e in range(epochs):  # made once: the stored labels the stage reads
        plan = plan_epoch(100, e, 0, mix_group=50, source_size=(28, 28), crop_scale=(0.25, 1.0), cutmix=True)
        values, indices = soft_labels(images, plan, [teacher], out_size=28)
        labels[e] = (plan, dense_labels(values, indices, 10))
    return lambda cl: train_student(build_student(arch, SHAPE, seed=0), images, labels.__getitem__, cfg,
                                    out_size=28, targets=targets, channels_last=cl)


def scoring(arch: str):
    g = torch.Generator().manual_seed(4)
    data = (torch.randn(2000, 1, 28, 28, generator=g), torch.randint(0, 10, (2000,), generator=g))
    model = build_student(arch, SHAPE, seed=0)

    def run(cl: bool) -> None:
        model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        evaluate_classifier(model, data, batch_size=500)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60, help="recover steps timed")
    ap.add_argument("--epochs", type=int, default=20, help="student epochs timed")
    ap.add_argument("--images", type=int, default=1280, help="squeeze training images")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [*((f"squeeze, 1 epoch of {args.images:,} images, {a}", squeeze(a, args.images))
               for a in ("convnet", "mobilenet_v2_x0_5", "shufflenet_v2_x0_5")),
             (f"recover, {args.steps} steps of the demo's PRISM shard", recover(args.steps)),
             *((f"student, {args.epochs} epochs, {a}", students(a, args.epochs))
               for a in ("convnet", "shufflenet_v2_x0_5")),
             *((f"scoring 2,000 images, {a}", scoring(a)) for a in ("convnet", "shufflenet_v2_x0_5"))]
    rows = []
    for what, fn in cases:
        t = best_of(args.repeats, fn)
        rows.append({"what": what, "nchw_s": round(t[False], 3), "nhwc_s": round(t[True], 3),
                     "speedup": round(t[False] / t[True], 2)})
        print(f"{what}: NCHW {t[False]:.2f} s, NHWC {t[True]:.2f} s", flush=True)
    print(table(rows, ["what", "nchw_s", "nhwc_s", "speedup"]))
    path = write_json(args.out or default_out("nhwc_cpu"), {"machine": machine(), "args": vars(args),
                                                                  "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
