"""Measure what the demo's pieces cost on this machine: a recover shard per method at the demo's settings and
a student epoch per architecture (plus its validation pass), with the threads a demo worker gets.

    .venv/bin/python bench/measure_costs.py [--threads 1] [--steps 30] [--epochs 3]

Teachers and students have random weights: the cost of a step does not depend on the weights. Prints one
Markdown table per measurement; the figures feed the demo trim and the sweep/study wall-time estimates
(docs/sweep.md).
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

import _common  # noqa: F401  (puts the repository on sys.path: runs without installing the package)
import torch  # noqa: E402

from prism_ray.algo.seeding import generator
from prism_ray.algo.selection import TeacherSelection
from prism_ray.algo.soft_labels import plan_epoch, soft_labels
from prism_ray.algo.student import build_student, train_student
from prism_ray.algo.synthesize import ShardSpec, synthesize_shard
from prism_ray.algo.teachers import ModelShape, build_model, freeze
from prism_ray.algo.train import evaluate_classifier
from prism_ray.config_loader import load_config
from prism_ray.data import build_dataset

DEMO = os.path.join(_common.ROOT, "jobs", "configs", "fmnist-demo.yaml")


def step_seconds(pool, rc, norm, init, steps: int) -> float:
    rc = type(rc)(**{**rc.__dict__, "iterations": steps, "schedule": "flat"})
    spec = ShardSpec("bench", 0, tuple(range(len(init))), 1)
    synthesize_shard(pool, spec, type(rc)(**{**rc.__dict__, "iterations": 2}), norm, init.clone())  # warm up
    t0 = time.perf_counter()
    synthesize_shard(pool, spec, rc, norm, init.clone())
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a demo worker has 1 CPU)")
    ap.add_argument("--steps", type=int, default=30, help="synthesis steps timed per teacher subset")
    ap.add_argument("--epochs", type=int, default=3, help="student epochs timed per architecture")
    ap.add_argument("--students", default="convnet,resnet18,mobilenet_v2_x0_5,shufflenet_v2_x0_5")
    ap.add_argument("--ipcs", default="10,50")
    ap.add_argument("--no-recover", action="store_true", help="students only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(DEMO)
    train = build_dataset(cfg.data, "train")
    norm = train.normalization
    shape = ModelShape(train.num_classes, cfg.data.channels, cfg.data.resolution)
    classes = list(range(train.num_classes))
    init = train.images_at(classes, 0)

    pool = {t.name: freeze(build_model(t.arch, shape, seed=0)) for t in cfg.teachers.models}
    if not args.no_recover:
        recover_costs(cfg, pool, norm, init, args.steps, args.threads)
    student_costs(cfg, train, shape, classes, pool[cfg.recover.primary], args)


def recover_costs(cfg, pool, norm, init, steps: int, threads: int) -> None:
    """Seconds per step for each BN teacher subset, weighted by how often `pre` selection draws it."""
    print(f"## recover, {len(init)} images per shard, {threads} thread(s)\n")
    print("| BN teachers | ms per step |\n|---|---|")
    rc = cfg.recover
    per_subset = {}
    extras = [n for n in rc.bn_pool if n != rc.primary]
    for r in range(len(extras) + 1):
        for subset in itertools.combinations(extras, r):
            fixed = type(rc)(**{**rc.__dict__, "selection": "fixed", "fixed": list(subset)})
            per_subset[frozenset(subset)] = step_seconds(pool, fixed, norm, init, steps)
            print(f"| {', '.join([rc.primary, *subset])} | {1000 * per_subset[frozenset(subset)]:.1f} |")
    draws = 2000
    freq = {}
    for i in range(draws):
        sel = TeacherSelection(rc.primary, "pre", pool=rc.bn_pool, slots=rc.slots, prob=rc.slot_prob,
                               generator=generator(i, "teachers"))
        key = frozenset(sel.candidates()[1:])
        freq[key] = freq.get(key, 0) + 1
    expected = sum(per_subset[k] * n / draws for k, n in freq.items())
    sre2l = cfg.recover_methods()["sre2l"]
    print(f"\nPRISM (`pre`, {rc.slots} slots at {rc.slot_prob}): expected {1000 * expected:.1f} ms per step, "
          f"{expected * rc.iterations:.1f} s per shard of {rc.iterations} iterations")
    print(f"SRe2L (primary only): {1000 * per_subset[frozenset()]:.1f} ms per step, "
          f"{per_subset[frozenset()] * sre2l.iterations:.1f} s per shard of {sre2l.iterations} iterations\n")



def student_costs(cfg, train, shape, classes, teacher, args) -> None:
    """Seconds per student epoch (labels precomputed, as stored mode reads them) and per validation pass."""
    val = build_dataset(cfg.data, "val", class_names=train.class_names, capped=False)
    xv, yv = val.tensors(list(range(min(len(val), cfg.data.max_val or len(val)))))
    e = cfg.evaluate
    print(f"## students, batch {e.batch_size}, {args.threads} thread(s), validation on {len(yv)} images\n")
    print("| student | images | s per epoch | s per validation |\n|---|---|---|---|")
    for ipc in [int(v) for v in args.ipcs.split(",")]:
        images = torch.cat([train.images_at(classes, k) for k in range(ipc)])
        targets = torch.tensor(classes * ipc)
        plans = [plan_epoch(len(images), ep, 3, mix_group=cfg.relabel.mix_group, source_size=(28, 28),
                            crop_scale=cfg.relabel.crop_scale, cutmix=True) for ep in range(args.epochs + 1)]
        t0 = time.perf_counter()
        labels = [soft_labels(images, p, [teacher], out_size=28)[0].float() for p in plans]
        relabel_epoch = (time.perf_counter() - t0) / len(plans)
        print(f"| (relabel by {cfg.recover.primary}) | {len(images)} | {relabel_epoch:.3f} | |")
        for arch in args.students.split(","):
            ecfg = type(e)(**{**e.__dict__, "epochs": args.epochs + 1})
            model = build_student(arch, shape, 0)
            times = []

            def on_end(epoch, state, times=times):
                times.append(time.perf_counter())
            train_student(model, images, lambda ep: (plans[ep], labels[ep]), ecfg, out_size=28, targets=targets,
                          on_epoch_end=on_end)
            per_epoch = (times[-1] - times[0]) / (len(times) - 1)  # epoch 0 includes warm-up
            t0 = time.perf_counter()
            evaluate_classifier(model, (xv, yv), batch_size=e.val_batch_size)
            print(f"| {arch} | {len(images)} | {per_epoch:.3f} | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
