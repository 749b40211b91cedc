"""What bf16 changes, side by side on the same seeds: fp32 against bf16 recover, and fp32 against bf16 students.

Teachers: the reference's ImageNet architectures at `--resolution` px with random weights (resnet18 primary;
BN teachers mobilenet_v2, efficientnet_b0, shufflenet_v2_x0_5 and alexnet), their BN running statistics set
by `--calibration` photo-like images (smooth shading, texture and a sharp-edged object), so that the BN loss
has a target a real teacher could have. Nothing here needs data or weights from outside.

Recover: one shard of `--images` photo-like images (real init), every BN teacher every step (selection fixed,
bn_average reference), `--iterations` flat steps at lr 0.05, the reference's crop, flip and 32 px roll. Run
with recover.precision fp32 and bf16 on the same shard seed (the same views), and once more in fp32 with
another seed (other views): the scale of an ordinary rerun. Reported: the loss curves (CE, BN) and their
largest relative gap; PSNR between final images (bf16 vs fp32, other seed vs fp32, and fp32 vs its initial
images: how far the images moved); the BN term of each final set evaluated in fp32 on 16 fixed random
views (the same views for every set); per BN layer, the relative distance between the input statistics a
bf16 and an fp32 forward pass compute on the same images; and the cosine between the bf16 and fp32 image
gradients of the first step (of the loss, and of its CE and BN terms apart).

Students: resnet18 on `--student-images` photo-like images (10 classes) with soft labels of the random
resnet18 teacher (1000 logits), the PRISM recipe (MSE + 0.1 CE, AdamW 1e-3, 2 x micro-batches, per-epoch
schedule) for `--student-epochs` epochs: fp32 and bf16 from the same initial weights, and fp32 from another
initialisation. Reported: loss per epoch, the relative distance of the final weights, and on `--held-out`
other photo-like images the students' logit distance and top-1 agreement.

Usage: python bench/bf16_effect.py [--images 4] [--iterations 200] [--student-images 20] [--student-epochs 3]
                                   [--out bench/results/bf16_effect.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time

from _common import default_out, machine, table, write_json

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from prism_ray.algo.augment import apply_view, draw_view  # noqa: E402
from prism_ray.algo.bn_loss import average_bn_loss, bn_layers, channel_stats  # noqa: E402
from prism_ray.algo.encode import to_uint8  # noqa: E402
from prism_ray.algo.seeding import generator  # noqa: E402
from prism_ray.algo.soft_labels import dense_labels, plan_epoch, soft_labels  # noqa: E402
from prism_ray.algo.student import build_student, train_student  # noqa: E402
from prism_ray.algo.synthesize import ShardSpec, TeacherSet, synthesize_shard  # noqa: E402
from prism_ray.algo.teachers import ModelShape, build_model, freeze  # noqa: E402
from prism_ray.algo.train import recalibrate_bn  # noqa: E402
from prism_ray.config import EvaluateConfig, RecoverConfig  # noqa: E402
from prism_ray.data.base import IMAGENET_STATS, Normalization  # noqa: E402

PRIMARY = "resnet18"
POOL = ["mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet"]
CLASSES = 1000


def photos(n: int, size: int, seed: int) -> torch.Tensor:
    """n photo-like RGB images as [0, 1] floats (n, 3, size, size)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        f = rng.uniform(6, 30, (3, 2))
        phase = rng.uniform(0, 6.3, 3)
        img = np.stack([128 + 90 * np.sin(x / f[c, 0] + phase[c]) * np.cos(y / f[c, 1]) for c in range(3)], -1)
        img += rng.normal(0, 20, img.shape)
        t, l = rng.integers(0, size // 2, 2)
        img[t:t + size // 3, l:l + size // 3] = rng.integers(0, 256, 3)
        out.append(np.clip(img, 0, 255))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255)


def teacher_pool(shape: ModelShape, norm: Normalization, calibration: int) -> dict:
    pool = {}
    calib = norm.normalize(photos(calibration, shape.resolution, seed=99))
    labels = torch.zeros(len(calib), dtype=torch.int64)
    for i, name in enumerate([PRIMARY, *POOL]):
        model = build_model(name, shape, seed=i)
        recalibrate_bn(model, (calib, labels), batch_size=16, max_images=len(calib))
        pool[name] = freeze(model)
    return pool


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def bn_term_fp32(pool: dict, x: torch.Tensor, cfg: RecoverConfig, views: int = 16) -> float:
    """The objective's BN term (reference divisor, without r_bn) of images x in fp32, averaged over `views` fixed
    random views (crop, flip, roll as the objective draws them; the same views for every set compared)."""
    teachers = TeacherSet(pool, "cpu", amp=False, first_bn_multiplier=cfg.first_bn_multiplier)
    g = generator(1234, "bf16-bench-views")
    total = 0.0
    try:
        with torch.no_grad():
            for _ in range(views):
                xv = apply_view(x, draw_view(g, x.shape[-2], x.shape[-1], cfg.crop_scale, cfg.jitter))
                losses = {n: teachers.forward(n, xv)[1] if teachers.has_bn(n) else None for n in [PRIMARY, *POOL]}
                total += float(average_bn_loss(losses, "reference"))
        return total / views
    finally:
        teachers.close()


def statistics_gap(pool: dict, x: torch.Tensor) -> list[dict]:
    """Per teacher: relative L2 distance between the per-channel mean / variance of every BN layer's input as a
    bf16 forward pass computes them and as an fp32 one does, on the same images (median and largest layer)."""
    rows = []
    for name in [PRIMARY, *POOL]:
        stats = {}
        for precision in ("fp32", "bf16"):
            teachers = TeacherSet({name: pool[name]}, "cpu", amp=precision == "bf16")
            model = teachers.models[name]
            seen = []
            handles = [layer.register_forward_hook(lambda m, inp, out: seen.append(channel_stats(inp[0].detach())))
                       for layer in bn_layers(model)]
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model(x)
            for h in handles:
                h.remove()
            teachers.close()
            stats[precision] = seen
        if not stats["fp32"]:
            continue
        gaps = {"mean": [], "var": []}
        for (v32, m32), (v16, m16) in zip(stats["fp32"], stats["bf16"]):
            gaps["mean"].append(((m16 - m32).norm() / m32.norm().clamp_min(1e-12)).item())
            gaps["var"].append(((v16 - v32).norm() / v32.norm().clamp_min(1e-12)).item())
        rows.append({"teacher": name, "bn_layers": len(stats["fp32"]),
                     "mean_gap_median": float(np.median(gaps["mean"])), "mean_gap_max": max(gaps["mean"]),
                     "var_gap_median": float(np.median(gaps["var"])), "var_gap_max": max(gaps["var"])})
    return rows


def first_step_gradient(pool: dict, spec: ShardSpec, cfg: RecoverConfig, x0: torch.Tensor, bf16: bool) -> dict:
    """The image gradients of the first step's objective (the engine's view and loss): of the whole loss, of
    its CE term and of its BN term, each flattened."""
    out = {}
    for part in ("loss", "ce", "bn"):
        teachers = TeacherSet(pool, "cpu", amp=bf16, first_bn_multiplier=cfg.first_bn_multiplier)
        try:
            x = x0.clone().requires_grad_(True)
            view = draw_view(generator(spec.seed, "augment"), x.shape[-2], x.shape[-1], cfg.crop_scale, cfg.jitter)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                xv = apply_view(x, view)
                logits, primary_bn = teachers.forward(PRIMARY, xv)
                losses = {PRIMARY: primary_bn}
                for n in POOL:
                    losses[n] = teachers.forward(n, xv)[1] if teachers.has_bn(n) else None
            ce = F.cross_entropy(logits.float(), torch.tensor(spec.class_ids))
            bn = cfg.r_bn * average_bn_loss(losses, "reference")
            {"loss": ce + bn, "ce": ce, "bn": bn}[part].backward()
            out[part] = x.grad.flatten()
        finally:
            teachers.close()
    return out


def recover_part(args, pool: dict, norm: Normalization) -> dict:
    res = args.resolution
    init = norm.normalize(photos(args.images, res, seed=1))
    classes = tuple(range(args.images))
    base = RecoverConfig(primary=PRIMARY, bn_pool=list(POOL), selection="fixed", fixed=list(POOL),
                         bn_average="reference", init="real", lr=0.05, iterations=args.iterations, schedule="flat",
                         jitter=32, crop_scale=[0.08, 1.0], class_group=args.images)
    runs, seconds = {}, {}
    for key, precision, seed in (("fp32", "fp32", 5), ("bf16", "bf16", 5), ("fp32_other_seed", "fp32", 6)):
        cfg = dataclasses.replace(base, precision=precision)
        t0 = time.perf_counter()
        runs[key] = synthesize_shard(pool, ShardSpec(key, 0, classes, seed), cfg, norm, init)
        seconds[key] = time.perf_counter() - t0
        print(f"recover {key}: {seconds[key]:.0f} s, final CE {runs[key].history['loss_ce'][-1]:.4f} "
              f"BN {runs[key].history['loss_bn'][-1]:.3f}", flush=True)
    a, b = runs["fp32"].history, runs["bf16"].history
    curve = [{"iteration": it, "ce_fp32": a["loss_ce"][i], "ce_bf16": b["loss_ce"][i], "bn_fp32": a["loss_bn"][i],
              "bn_bf16": b["loss_bn"][i], "bn_fp32_other_seed": runs["fp32_other_seed"].history["loss_bn"][i]}
             for i, it in enumerate(a["iteration"])]
    rel = lambda p, q: abs(p - q) / max(abs(q), 1e-12)  # noqa: E731
    pixels = {k: to_uint8(r.images, norm) for k, r in runs.items()}
    start = to_uint8(init, norm)
    spec = ShardSpec("grad", 0, classes, 5)
    g32 = first_step_gradient(pool, spec, base, init, bf16=False)
    g16 = first_step_gradient(pool, spec, base, init, bf16=True)
    return {
        "seconds": seconds,
        "loss_curve": curve,
        "largest_relative_gap": {"ce": max(rel(r["ce_bf16"], r["ce_fp32"]) for r in curve),
                                 "bn": max(rel(r["bn_bf16"], r["bn_fp32"]) for r in curve),
                                 "bn_other_seed": max(rel(r["bn_fp32_other_seed"], r["bn_fp32"]) for r in curve)},
        "final": {k: {"ce": r.history["loss_ce"][-1], "bn": r.history["loss_bn"][-1]} for k, r in runs.items()},
        "psnr_db": {"bf16_vs_fp32": psnr(pixels["bf16"], pixels["fp32"]),
                    "fp32_other_seed_vs_fp32": psnr(pixels["fp32_other_seed"], pixels["fp32"]),
                    "fp32_final_vs_init": psnr(pixels["fp32"], start)},
        "bn_term_of_final_images_fp32": {k: bn_term_fp32(pool, r.images, base) for k, r in runs.items()},
        "bn_term_of_initial_images_fp32": bn_term_fp32(pool, init, base),
        "bn_input_statistics_gap_bf16_vs_fp32": statistics_gap(pool, init),
        "first_step_gradient_cosine_bf16_vs_fp32": float(F.cosine_similarity(g32["loss"], g16["loss"], dim=0)),
        "first_step_gradient_cosine_by_term": {k: float(F.cosine_similarity(g32[k], g16[k], dim=0))
                                               for k in ("ce", "bn")},
        "first_step_gradient_norm_fp32": {k: float(g32[k].norm()) for k in ("loss", "ce", "bn")},
    }


def student_part(args, pool: dict, norm: Normalization) -> dict:
    res, n = args.resolution, args.student_images
    images = norm.normalize(photos(n, res, seed=3))
    targets = torch.arange(n) % 10
    held_out = norm.normalize(photos(args.held_out, res, seed=4))
    teacher = pool[PRIMARY]
    shape = ModelShape(CLASSES, 3, res)
    plans = [plan_epoch(n, e, 7, mix_group=10, source_size=(res, res), crop_scale=(0.25, 1.0), cutmix=True)
             for e in range(args.student_epochs)]
    labels = [dense_labels(*soft_labels(images, p, [teacher], out_size=res), CLASSES) for p in plans]
    models, seconds, final_loss = {}, {}, {}
    for key, precision, init_seed in (("fp32", "fp32", 0), ("bf16", "bf16", 0), ("fp32_other_init", "fp32", 1)):
        cfg = EvaluateConfig(students=[PRIMARY], epochs=args.student_epochs, batch_size=10, accumulation_steps=2,
                             schedule="prism_reference", precision=precision, loss="mse_ce", ce_weight=0.1)
        model = build_student(PRIMARY, shape, seed=init_seed)
        t0 = time.perf_counter()
        trained = train_student(model, images, lambda e: (plans[e], labels[e]), cfg, out_size=res, targets=targets,
                                seed=1)
        seconds[key] = time.perf_counter() - t0
        models[key] = model
        final_loss[key] = trained["final_loss"]
        print(f"student {key}: {seconds[key]:.0f} s, last epoch's loss {final_loss[key]:.4f}", flush=True)
    with torch.no_grad():
        logits = {k: m.eval()(held_out) for k, m in models.items()}

    def weights_gap(a, b) -> float:
        da = torch.cat([p.flatten() for p in models[a].parameters()])
        db = torch.cat([p.flatten() for p in models[b].parameters()])
        return float((da - db).norm() / db.norm())

    def logit_gap(a, b) -> dict:
        return {"relative_l2": float((logits[a] - logits[b]).norm() / logits[b].norm()),
                "top1_agreement": float((logits[a].argmax(1) == logits[b].argmax(1)).float().mean())}
    return {"seconds": seconds, "last_epoch_loss": final_loss,
            "weights_relative_gap": {"bf16_vs_fp32": weights_gap("bf16", "fp32"),
                                     "fp32_other_init_vs_fp32": weights_gap("fp32_other_init", "fp32")},
            "held_out_logits": {"bf16_vs_fp32": logit_gap("bf16", "fp32"),
                                "fp32_other_init_vs_fp32": logit_gap("fp32_other_init", "fp32")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--images", type=int, default=4, help="images in the recover shard")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--calibration", type=int, default=32, help="photo-like images that set the BN statistics")
    p.add_argument("--student-images", type=int, default=20)
    p.add_argument("--student-epochs", type=int, default=3)
    p.add_argument("--held-out", type=int, default=20)
    p.add_argument("--skip", choices=["recover", "students"], default=None)
    p.add_argument("--out", default=str(default_out("bf16_effect")))
    args = p.parse_args()
    torch.manual_seed(0)
    norm = Normalization(*IMAGENET_STATS)
    shape = ModelShape(CLASSES, 3, args.resolution)
    t0 = time.perf_counter()
    pool = teacher_pool(shape, norm, args.calibration)
    result = {"bench": "bf16_effect", "machine": machine(),
              "setup": {k: v for k, v in vars(args).items() if k != "out"} | {
                  "primary": PRIMARY, "bn_teachers": POOL, "weights": "random, BN statistics from photo-like "
                                                                      "images", "classes": CLASSES}}
    if args.skip != "recover":
        result["recover"] = recover_part(args, pool, norm)
    if args.skip != "students":
        result["students"] = student_part(args, pool, norm)
    result["seconds"] = time.perf_counter() - t0
    write_json(args.out, result)
    if "recover" in result:
        r = result["recover"]
        print(table([{"what": "PSNR bf16 vs fp32 (dB)", "value": r["psnr_db"]["bf16_vs_fp32"]},
                     {"what": "PSNR fp32 other seed vs fp32 (dB)", "value": r["psnr_db"]["fp32_other_seed_vs_fp32"]},
                     {"what": "PSNR fp32 final vs init (dB)", "value": r["psnr_db"]["fp32_final_vs_init"]},
                     {"what": "largest CE gap bf16/fp32", "value": r["largest_relative_gap"]["ce"]},
                     {"what": "largest BN gap bf16/fp32", "value": r["largest_relative_gap"]["bn"]},
                     {"what": "first-step gradient cosine", "value": r["first_step_gradient_cosine_bf16_vs_fp32"]}],
                    ["what", "value"]))
    if "students" in result:
        s = result["students"]
        print(table([{"what": k, **v} for k, v in s["held_out_logits"].items()],
                    ["what", "relative_l2", "top1_agreement"]))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
