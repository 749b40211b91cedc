"""The demo's student phase, measured: one student at a time (as the evaluate stage trains them), the same in
channels_last, and several students of one architecture trained in one process at once; and the scoring of
the test split, on this machine.

    .venv/bin/python bench/students_grouped.py [--epochs 10] [--group 5] [--threads 1]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 .venv/bin/python bench/students_grouped.py   # an AVX2 CPU's kernels

The demo's shapes: Fashion-MNIST 28 px, 100 images (IPC 10), batch 50 (2 steps per epoch), 200 epochs, the
`prism` recipe (AdamW, MSE + 0.1 CE, cosine per step), ConvNet and ShuffleNetV2 x0.5 students, scoring on the
10,000 test images. Labels come from a ConvNet teacher with random weights (the cost does not depend on them).
Training is timed over --epochs epochs and scaled to 200 (every epoch costs the same).

Variants: `alone` (train_student, NCHW), `alone_cl` (the same steps, model and batches channels_last),
`grouped` / `grouped_cl`: the seeds' parameters and BN buffers stacked (torch.func.stack_module_state) and one
functional_call under torch.func.vmap over the seed axis, the batch shared (every seed of a set sees the same
epoch plan and labels). BN in train mode updates its running statistics in place: that works under vmap when
the buffers are batched too. The loss is the sum of the seeds' own losses, so each seed's gradient is its own,
and AdamW works elementwise on the stacked tensors. The last table says how far each variant's seed drifts
from the same seed trained `alone` (weights, and top-1 after the timed epochs).

Prints Markdown tables and writes bench/results/students_grouped.json (or --out).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

from _common import ROOT, default_out, machine, table, write_json

import torch  # noqa: E402
from torch.func import functional_call, stack_module_state, vmap  # noqa: E402

from prism_ray.algo.soft_labels import augment_batch, plan_epoch, soft_labels  # noqa: E402
from prism_ray.algo.student import (build_optimizer, build_scheduler, build_student, distill_loss,  # noqa: E402
                                    no_decay_parameters, train_student)
from prism_ray.algo.teachers import ModelShape, build_model, freeze  # noqa: E402
from prism_ray.algo.train import evaluate_classifier  # noqa: E402
from prism_ray.config_loader import load_config  # noqa: E402
from prism_ray.data import build_dataset  # noqa: E402

DEMO = str(ROOT / "jobs" / "configs" / "fmnist-demo.yaml")


def demo_inputs(cfg, epochs: int):
    """The demo's 100 real images (k-th image of each class, k < 10), targets, and `epochs` plans with labels."""
    train = build_dataset(cfg.data, "train")
    classes = list(range(train.num_classes))
    images = torch.cat([train.images_at(classes, k) for k in range(cfg.recover.ipc)])
    targets = torch.tensor(classes * cfg.recover.ipc)
    shape = ModelShape(train.num_classes, cfg.data.channels, cfg.data.resolution)
    teacher = freeze(build_model(cfg.recover.primary, shape, seed=0))
    plans, labels = [], []
    for ep in range(epochs):
        plan = plan_epoch(len(images), ep, cfg.run.seed, mix_group=cfg.relabel.mix_group,
                          source_size=(cfg.data.resolution,) * 2, crop_scale=cfg.relabel.crop_scale, cutmix=True)
        plans.append(plan)
        labels.append(soft_labels(images, plan, [teacher], out_size=cfg.data.resolution)[0].float())
    return train, images, targets, plans, labels, shape


def to_layout(model, channels_last: bool):
    return model.to(memory_format=torch.channels_last) if channels_last else model


def layout(x, channels_last: bool):
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_alone(arch, shape, seed, images, targets, plans, labels, ecfg, out_size, channels_last=False):
    """One student: contiguous through train_student (what the evaluate stage runs), or the same steps with model
    and batches in channels_last (train_epoch does that on CUDA only)."""
    if not channels_last:
        model = build_student(arch, shape, seed)
        t0 = time.perf_counter()
        train_student(model, images, lambda ep: (plans[ep], labels[ep]), ecfg, out_size=out_size, targets=targets,
                      seed=seed)
        return model, time.perf_counter() - t0
    model = to_layout(build_student(arch, shape, seed), channels_last)
    opt = build_optimizer(model, ecfg)
    sched = build_scheduler(opt, ecfg, math.ceil(len(images) / ecfg.batch_size), schedule=ecfg.schedule)
    n, bs = len(images), ecfg.batch_size
    model.train()
    t0 = time.perf_counter()
    for ep in range(ecfg.epochs):
        plan, lab = plans[ep], labels[ep]
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            x = layout(augment_batch(images[plan.order[start:stop]], plan, start, stop, out_size), channels_last)
            y = targets[plan.order[start:stop]]
            loss = distill_loss(model(x), lab[start:stop], ecfg, targets=y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model, time.perf_counter() - t0


class GroupedStudents:
    """G students of one architecture as stacked tensors, trained with one vmapped forward per batch."""

    def __init__(self, models, ecfg, steps_per_epoch: int, channels_last: bool = False):
        self.base = copy.deepcopy(models[0]).to("meta")
        self.params, self.buffers = stack_module_state(models)
        self.G = len(models)
        self.channels_last = channels_last
        skip = no_decay_parameters(models[0])
        names = {id(p): n for n, p in models[0].named_parameters()}
        decay = [self.params[names[i]] for i in names if i not in skip]
        no_decay = [self.params[names[i]] for i in names if i in skip]
        groups = [{"params": decay, "weight_decay": ecfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=ecfg.lr, weight_decay=ecfg.weight_decay)
        self.sched = build_scheduler(self.opt, ecfg, steps_per_epoch, schedule=ecfg.schedule)
        self.ecfg = ecfg

        def call(p, b, x):
            return functional_call(self.base, (p, b), (x,))
        self.forward = vmap(call, in_dims=(0, 0, None))

    def train_epoch(self, images, plan, labels, targets, out_size: int) -> None:
        n, bs = len(plan), self.ecfg.batch_size
        self.base.train()
        for start in range(0, n, bs):
            stop = min(start + bs, n)
            x = layout(augment_batch(images[plan.order[start:stop]], plan, start, stop, out_size), self.channels_last)
            y = targets[plan.order[start:stop]]
            logits = self.forward(self.params, self.buffers, x)  # (G, B, K)
            loss = sum(distill_loss(logits[g], labels[start:stop], self.ecfg, targets=y) for g in range(self.G))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()

    def student(self, g: int, like):
        """Seed g's weights and buffers back in a plain module `like` (for scoring and comparison)."""
        m = copy.deepcopy(like)
        m.load_state_dict({**{k: v[g].detach() for k, v in self.params.items()},
                           **{k: v[g] for k, v in self.buffers.items()}})
        return m

    @torch.no_grad()
    def score(self, x, y, batch: int) -> list[float]:
        self.base.eval()
        hits = torch.zeros(self.G, dtype=torch.int64)
        for a in range(0, len(x), batch):
            logits = self.forward(self.params, self.buffers, layout(x[a:a + batch], self.channels_last))
            hits += (logits.argmax(-1) == y[a:a + batch]).sum(-1)
        return (hits.double() / len(x)).tolist()


def train_group(arch, shape, seeds, images, targets, plans, labels, ecfg, out_size, channels_last=False):
    models = [build_student(arch, shape, s) for s in seeds]
    t0 = time.perf_counter()
    g = GroupedStudents(models, ecfg, math.ceil(len(images) / ecfg.batch_size), channels_last)
    for ep in range(ecfg.epochs):
        g.train_epoch(images, plans[ep], labels[ep], targets, out_size)
    return g, models[0], time.perf_counter() - t0


@torch.no_grad()
def score_alone(model, x, y, batch: int, channels_last=False) -> tuple[float, float]:
    """(top-1, seconds) of one student on tensors, as evaluate_classifier does it, in the asked layout."""
    model = to_layout(model, channels_last).eval()
    t0 = time.perf_counter()
    hits = 0
    for a in range(0, len(x), batch):
        hits += int((model(layout(x[a:a + batch], channels_last)).argmax(1) == y[a:a + batch]).sum())
    return hits / len(x), time.perf_counter() - t0


def max_param_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())


VARIANTS = ("alone", "alone_cl", "grouped", "grouped_cl")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10, help="epochs timed per variant (scaled to --full-epochs)")
    ap.add_argument("--full-epochs", type=int, default=200, help="the demo's epochs, for the per-student figures")
    ap.add_argument("--group", type=int, default=5, help="seeds trained together")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a demo worker has one CPU)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--students", default="convnet,shufflenet_v2_x0_5")
    ap.add_argument("--val", type=int, default=10000, help="test images scored")
    ap.add_argument("--val-batches", default="500,2000", help="scoring batch sizes to time")
    ap.add_argument("--check-seeds", type=int, default=2, help="seeds trained alone and grouped, compared")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(DEMO)
    ecfg = type(cfg.evaluate)(**{**cfg.evaluate.__dict__, "epochs": args.epochs})
    out_size = cfg.data.resolution
    train, images, targets, plans, labels, shape = demo_inputs(cfg, args.epochs)
    val = build_dataset(cfg.data, "val", class_names=train.class_names, capped=False)
    n_val = min(args.val, len(val))
    xv, yv = val.tensors(list(range(n_val)))
    subset = torch.utils.data.Subset(val, range(n_val))
    scale = args.full_epochs / args.epochs
    variants = args.variants.split(",")
    seeds = list(range(args.group))
    rows, scoring, checks = [], [], []
    for arch in args.students.split(","):
        warm = type(ecfg)(**{**ecfg.__dict__, "epochs": 1})  # first calls allocate and pick kernels
        for cl in (False, True):
            train_alone(arch, shape, 99, images, targets, plans, labels, warm, out_size, cl)
        trained = {}
        for v in variants:
            cl = v.endswith("_cl")
            if v.startswith("alone"):
                sec = 0.0
                for s in seeds:
                    m, t = train_alone(arch, shape, s, images, targets, plans, labels, ecfg, out_size, cl)
                    sec += t
                    if s < args.check_seeds:
                        trained[(v, s)] = m
                per_student = sec / len(seeds) * scale
            else:
                g, like, sec = train_group(arch, shape, seeds, images, targets, plans, labels, ecfg, out_size, cl)
                for s in range(args.check_seeds):
                    trained[(v, s)] = g.student(s, like)
                per_student = sec / len(seeds) * scale
                t0 = time.perf_counter()
                g.score(xv, yv, 500)
                scoring.append({"student": arch, "how": f"{v}: {args.group} seeds at once, batch 500",
                                "s_per_student": round((time.perf_counter() - t0) / len(seeds), 2)})
            rows.append({"student": arch, "variant": v, "train_s_per_student": round(per_student, 1)})
            print(f"{arch} {v}: {per_student:.1f} s per student ({args.full_epochs} epochs)", flush=True)
        base = rows[-len(variants)]["train_s_per_student"]
        for r in rows[-len(variants):]:
            r["speedup"] = round(base / r["train_s_per_student"], 2)
        model = trained[(variants[0], 0)]
        t0 = time.perf_counter()
        evaluate_classifier(model, subset, batch_size=cfg.evaluate.val_batch_size, num_workers=1)
        scoring.append({"student": arch, "how": "evaluate stage: dataset streamed, 1 loader process, batch 500",
                        "s_per_student": round(time.perf_counter() - t0, 2)})
        for batch in [int(b) for b in args.val_batches.split(",")]:
            for cl in (False, True):
                _, sec = score_alone(model, xv, yv, batch, cl)
                scoring.append({"student": arch, "how": f"tensors, batch {batch}" + (", channels_last" if cl else ""),
                                "s_per_student": round(sec, 2)})
        for (v, s), m in trained.items():
            if v == variants[0]:
                continue
            ref = trained[(variants[0], s)]
            checks.append({"student": arch, "variant": v, "seed": s, "epochs": args.epochs,
                           "max_weight_diff": max_param_diff(ref, m),
                           "top1_alone": score_alone(ref, xv, yv, 500)[0], "top1_variant": score_alone(m, xv, yv, 500)[0]})
    print(f"\n## training, seconds per student at {args.full_epochs} epochs ({args.epochs} timed), "
          f"{args.threads} thread(s)\n")
    print(table(rows, ["student", "variant", "train_s_per_student", "speedup"]))
    print(f"\n## scoring {n_val:,} test images\n")
    print(table(scoring, ["student", "how", "s_per_student"]))
    print(f"\n## each variant against the same seed trained alone (contiguous), after {args.epochs} epochs\n")
    print(table(checks, list(checks[0]) if checks else ["student"]))
    write_json(args.out or default_out("students_grouped"), {
        "machine": machine(), "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
        "group": args.group, "epochs_timed": args.epochs, "val_images": n_val, "training": rows, "scoring": scoring,
        "checks": checks})


if __name__ == "__main__":
    main()
