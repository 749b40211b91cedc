"""Relabel and student throughput at 224 px through the public functions (plan_epoch, soft_labels, train_student).

Images per second for:
  - the relabel data path alone: the epoch plan's crops, flips and CutMix, with a stand-in teacher that
    costs nothing (a 1x1 linear map of the channel means);
  - soft labels: the same with a real teacher's forward pass (resnet18 by default);
  - student training steps (resnet18 by default, the PRISM recipe: AdamW, MSE + 0.1 CE, batches of 50).
The set is random 8-bit images (cost does not depend on content). With the uint8 image sets of
prism_ray.algo.image_source (helper "sets"), the set lives on the device as uint8 (`ResidentImages`);
without it, as a normalized float tensor. Either way the same calls are timed; the JSON says which path ran.

Usage: python bench/relabel_student.py [--images N] [--epochs 2] [--out bench/results/relabel_student.json]
(N defaults to 100 on CPU, 5000 on a GPU.)
"""
from __future__ import annotations

import argparse
import time

from _common import bf16_peak, default_out, known_gpu, machine, table, write_json

import torch  # noqa: E402
from torch import nn  # noqa: E402

from prism_ray.algo.soft_labels import plan_epoch, soft_labels  # noqa: E402
from prism_ray.algo.student import train_student  # noqa: E402
from prism_ray.algo.teachers import ModelShape, build_model, freeze  # noqa: E402
from prism_ray.config import EvaluateConfig  # noqa: E402
from prism_ray.data.base import IMAGENET_STATS, Normalization  # noqa: E402


class MeanTeacher(nn.Module):
    """A teacher that costs nothing: logits from the per-channel means, so the data path's cost is all there is."""

    def __init__(self, classes: int):
        super().__init__()
        self.head = nn.Linear(3, classes)

    def forward(self, x):
        return self.head(x.float().mean((2, 3)))


def image_set(pixels: torch.Tensor, norm: Normalization, device: torch.device):
    """The set as the relabel and evaluate stages hold it: uint8 on the device when the uint8 sets exist."""
    try:
        from prism_ray.algo.image_source import ResidentImages
    except ImportError:
        return norm.normalize(pixels.float().div_(255.0)).to(device), "normalized float tensor"
    return ResidentImages(pixels.to(device), norm), "uint8 resident (ResidentImages)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, help="images in the set (default 100 on CPU, 5000 on a GPU)")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--mix-group", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=2, help="student epochs timed (the first one warms up)")
    ap.add_argument("--out", default=str(default_out("relabel_student")))
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = args.images or (5000 if device.type == "cuda" else 100)
    res, k = args.resolution, args.classes
    shape = ModelShape(k, 3, res)
    norm = Normalization(*IMAGENET_STATS)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, res, res), dtype=torch.uint8, generator=g)
    images, path = image_set(pixels, norm, device)
    targets = torch.randint(0, k, (n,), generator=g)
    plan = lambda epoch: plan_epoch(n, epoch, 0, mix_group=args.mix_group, source_size=(res, res),  # noqa: E731
                                    crop_scale=[0.25, 1.0], cutmix=True, out_size=res)
    rows = []

    def relabel(name: str, teacher: nn.Module) -> None:
        teacher = freeze(teacher).to(device)
        p = plan(0)
        soft_labels(images, p, [teacher], out_size=res, device=device, stop=min(n, args.mix_group))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        values, _ = soft_labels(images, p, [teacher], out_size=res, device=device)
        sync(device)
        seconds = time.perf_counter() - t0
        assert values.shape == (n, k)
        rows.append({"what": name, "images": n, "seconds": seconds, "images_per_s": n / seconds,
                     "ms_per_image": 1000 * seconds / n})

    relabel("relabel data path (crop, flip, CutMix; no teacher)", MeanTeacher(k))
    relabel(f"soft labels ({args.teacher} teacher)", build_model(args.teacher, shape, seed=1))

    cuda = device.type == "cuda"
    cfg = EvaluateConfig(students=[args.student], epochs=args.epochs, batch_size=args.batch_size, optimizer="adamw",
                         lr=1e-3, weight_decay=0.01, loss="mse_ce", ce_weight=0.1, accumulation_steps=1,
                         precision="bf16" if cuda else "fp32")  # on CUDA, bf16 + channels_last students
    logits = torch.randn(n, k, generator=g)  # the step's cost does not depend on the label values
    label_fn = lambda epoch: (plan(epoch), logits)  # noqa: E731
    marks = []
    kwargs = {"channels_last": True} if cuda else {}
    student = build_model(args.student, shape, seed=2)
    t0 = time.perf_counter()

    def on_epoch_end(epoch: int, state: dict) -> None:
        sync(device)
        marks.append(time.perf_counter())

    train_student(student, images, label_fn, cfg, out_size=res, device=device, targets=targets,
                  on_epoch_end=on_epoch_end, **kwargs)
    epoch_s = [b - a for a, b in zip([t0, *marks[:-1]], marks)]
    timed = epoch_s[1:] or epoch_s  # the first epoch includes warm-up
    seconds = sum(timed) / len(timed)
    rows.append({"what": f"student training ({args.student}, batch {args.batch_size}"
                         + (", bf16 + channels_last" if cuda else ", fp32") + ")",
                 "images": n, "seconds": seconds, "images_per_s": n / seconds, "ms_per_image": 1000 * seconds / n})

    result = {"bench": "relabel_student", "machine": machine(), "device": str(device), "data_path": path,
              "setup": {"images": n, "resolution": res, "classes": k, "mix_group": args.mix_group,
                        "batch_size": args.batch_size, "teacher": args.teacher, "student": args.student,
                        "student_epochs_timed": len(timed), "student_kwargs": kwargs,
                        "student_precision": cfg.precision},
              "rows": rows}
    gpu = known_gpu()
    if gpu:
        from prism_ray.estimate import network_flops
        result["gpu"] = gpu
        peak = bf16_peak(gpu)
        if peak:  # what `prism-ray plan --gpu` reads: achieved FLOP/s as a fraction of the bf16 peak
            teacher = network_flops(args.teacher, res, k, 3)["forward"]
            f = network_flops(args.student, res, k, 3)
            result["efficiency"] = {"relabel": rows[1]["images_per_s"] * teacher / (peak * 1e12),
                                    "evaluate": rows[2]["images_per_s"] * (f["forward"] + f["backward"]) / (peak * 1e12)}
    out = write_json(args.out, result)
    print(f"relabel and student throughput at {res} px on {device} ({result['machine']['cpu']}, "
          f"{result['machine']['threads']} threads); set held as: {path}\n")
    print(table(rows, ["what", "images", "images_per_s", "ms_per_image"]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
