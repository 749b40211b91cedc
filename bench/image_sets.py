"""Memory and speed of relabel and student workers holding a 224 px image set, on this machine (CPU).

Builds a run folder with a committed 224 px JPEG set (CLASSES x IPC, high-frequency content compressing like
recover outputs, ~0.75 bytes per pixel) and an ImageFolder validation set of photos-sized JPEGs (300-500 px),
then runs real RelabelWorker / StudentWorker units in fresh processes and prints one JSON line per case:
peak RSS of the worker process (VmHWM) and of its DataLoader processes, load time, images/s. `--old REV`
runs the same units with the code of git revision REV (exported to a temp folder), for the before/after.

Usage: python bench/image_sets.py [--images 5000] [--student resnet18] [--teacher resnet18] [--only relabel-host,...]
       [--old REV] [--keep DIR]
Cases: relabel-{host,encoded} (resnet18 teacher), student-{host,encoded} (student --student, 1 epoch,
stored labels from the relabel case), augment (per-image vs batched augmentation of one batch).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

CLASSES = 100


def picture(g: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """A smooth colour field plus fine texture: compresses like recover's synthetic images at quality 75."""
    w, h = size
    coarse = g.random((h // 16 + 2, w // 16 + 2, 3))
    big = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    texture = g.normal(0, 28, (h, w, 3))
    return np.clip(big + texture, 0, 255).astype(np.uint8)


def jpeg(arr: np.ndarray, quality: int = 75) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def commit_set(storage, set_names: list[str], classes: int, ipc: int, g: np.random.Generator) -> int:
    """A committed 224 px JPEG set of classes x ipc images (as recover commits one: a shard per IPC index, then
    the combined manifest), written under each of `set_names` (the same files); returns its encoded bytes."""
    from prism_ray.stages.recover import recover_prefix
    from prism_ray.storage import begin_stage

    stores = [begin_stage(storage, recover_prefix(name)) for name in set_names]
    total = 0
    for k in range(ipc):
        outputs, rows = [], []
        for c in range(classes):
            data = jpeg(picture(g, (224, 224)))
            total += len(data)
            outputs.append((f"images/{c:04d}/{c:04d}_ipc{k}.jpg", data))
            rows.append({"class_id": c, "ipc_index": k})
        for store in stores:
            store.commit(f"ipc{k:03d}", outputs, rows)
    for store in stores:
        store.write_combined()
    return total


def build(root: Path, images: int, val_images: int) -> dict:
    """Run folder with the committed set `prism`, train and val ImageFolders; returns the bench's facts."""
    from prism_ray.storage import Storage

    g = np.random.default_rng(0)
    ipc = images // CLASSES
    total = commit_set(Storage(str(root / "run")), ["prism"], CLASSES, ipc, g)
    for split, n in (("train", CLASSES), ("val", val_images)):
        for i in range(n):
            size = (int(g.integers(300, 500)), int(g.integers(300, 500)))
            path = root / split / f"c{i % CLASSES:03d}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(picture(g, size), 90))
    return {"images": ipc * CLASSES, "encoded_bytes_per_image": total / (ipc * CLASSES)}


WORKER = r'''
import json, os, resource, sys, time
import torch
from prism_ray.config_loader import config_from_dict
from prism_ray.stages.base import RunContext, Unit
from prism_ray.storage import Storage
root, case, student, holding, teacher = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
raw = {
    "run": {"name": "bench", "output": f"{root}/run", "seed": 0},
    "data": {"dataset": "image_folder", "train": f"{root}/train", "val": f"{root}/val", "channels": 3,
             "resolution": 224, "classes": 100},
    "teachers": {"models": [{"name": "resnet18", "arch": teacher, "weights": "random"},
                            {"name": "student_arch", "arch": student, "weights": "random"}]},
    "recover": {"primary": "resnet18", "ipc": 50, "class_group": 100},
    "baselines": {"random_real": False},
    "relabel": {"mode": "stored", "teachers": ["resnet18"], "epochs": 1, "epochs_per_shard": 1},
    "evaluate": {"recipe": "prism", "students": [student], "seeds": [0], "epochs": 1, "checkpoint_every": 1},
    "ray": {"workers": 1, "cpus_per_worker": 2},
}
cfg = config_from_dict(raw)
storage = Storage(cfg.run.output)
ctx = RunContext(100, [f"c{i:03d}" for i in range(100)], [1] * 100)
torch.manual_seed(0)
t0 = time.perf_counter()
if case == "relabel":
    from prism_ray.stages.relabel import RelabelStage, label_shards
    stage = RelabelStage(cfg, storage, ctx)
    unit = label_shards(cfg, "prism")[0]
else:
    from prism_ray.stages.evaluate import StudentStage
    stage = StudentStage(cfg, storage, ctx)
    unit = stage.units()[0]
stage.prepare()  # the driver's part: the stage's generation and the upstream outputs it reads
stage.bind()
worker = stage.open_worker()
if holding != "default":
    worker.sets.holding = holding
t1 = time.perf_counter()
s = worker.sets.get("prism")
t2 = time.perf_counter()
computed = worker.compute(unit)
t3 = time.perf_counter()
n = len(s.labels)
out = {"open_s": round(t1 - t0, 1), "load_s": round(t2 - t1, 1), "compute_s": round(t3 - t2, 1), "images": n}
if case == "relabel":
    if "--commit" in sys.argv:
        worker.commit(unit, computed)
        stage.finalize()  # the labels' combined manifest: what a student reads them through
    out["images_per_s"] = round(n / (t3 - t2), 1)
else:
    row = computed[1]
    out["images_per_s"] = round(n * cfg.evaluate.epochs / row["train_seconds"], 1)
    out["val_images"] = row["val_images"]
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
out["peak_rss_mb"] = round(hwm / 2 ** 20)
out["loader_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
out["holding"] = getattr(s, "holding", "float32 (old code)")
out["threads"] = torch.get_num_threads()
print("RESULT " + json.dumps(out), flush=True)
'''


def run_worker(code_root: Path, root: Path, case: str, student: str, holding: str, commit: bool = False,
               teacher: str = "resnet18") -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    args = [sys.executable, "-c", WORKER, str(root), case, student, holding, teacher] + (["--commit"] if commit else [])
    out = subprocess.run(args, env=env, capture_output=True, text=True, cwd=str(code_root))
    if out.returncode:
        raise SystemExit(f"{case} {holding} failed:\n{out.stderr[-3000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def augment_speed(batch: int = 50, reps: int = 5) -> dict:
    """One batch of 224 px positions: the previous per-image crop/resize/flip/paste vs the batched one."""
    from prism_ray.algo.image_source import ResidentImages
    from prism_ray.algo.soft_labels import _crop_resize, augment_positions, plan_epoch
    from prism_ray.data.base import IMAGENET_STATS, Normalization

    norm = Normalization(*IMAGENET_STATS)
    pixels = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    floats = norm.normalize(pixels.float().div(255))
    plan = plan_epoch(batch, 0, 0, mix_group=batch, source_size=(224, 224), crop_scale=(0.25, 1), cutmix=True)
    resident = ResidentImages(pixels, norm)

    def old():
        order, crops, flips = plan.order.tolist(), plan.crops.tolist(), plan.flips.tolist()
        out = torch.cat([_crop_resize(floats[order[p]], crops[p], flips[p], 224) for p in range(batch)])
        src = out.clone()
        for i in range(batch):
            j = int(plan.partner[i])
            if j != i:
                t, l, b, r = plan.mix_box[i].tolist()
                out[i, :, t:b, l:r] = src[j, :, t:b, l:r]
        return out

    def timed(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return round(batch * reps / (time.perf_counter() - t0), 1)

    return {"case": "augment", "per_image_images_per_s": timed(old),
            "batched_images_per_s": timed(lambda: augment_positions(resident, plan, 0, batch, 224)),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--val", type=int, default=1000)
    ap.add_argument("--student", default="resnet18")
    ap.add_argument("--teacher", default="resnet18", help="the relabel teacher's architecture (probe: ~free, so "
                                                         "the data path and memory are what is measured)")
    ap.add_argument("--only", default="augment,relabel-host,relabel-encoded,student-host,student-encoded")
    ap.add_argument("--old", default=None, help="git revision to compare with (its code is exported to a temp dir)")
    ap.add_argument("--keep", default=None, help="folder for the generated data (reused when it exists)")
    args = ap.parse_args()
    cases = args.only.split(",")
    if "augment" in cases:
        print(json.dumps(augment_speed()), flush=True)
    if not [c for c in cases if c != "augment"]:
        return
    with tempfile.TemporaryDirectory(prefix="prism-bench-sets-") as tmp:
        root = Path(args.keep or tmp)
        if not (root / "run").exists():
            t0 = time.perf_counter()
            facts = build(root, args.images, args.val)
            print(json.dumps({"case": "data", **facts, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        new_root = REPO
        old_root = None
        if args.old:
            old_root = Path(tmp) / "old-code"
            old_root.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.old], check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(old_root)], input=archive.stdout, check=True)
        labels_done = (root / "run" / "relabel" / "labels").exists()
        for case in cases:
            if case == "augment":
                continue
            kind, holding = case.split("-")
            if kind == "student" and not labels_done:  # stored labels for the student units
                run_worker(new_root, root, "relabel", args.student, "host", commit=True, teacher=args.teacher)
                labels_done = True
            res = run_worker(new_root, root, kind, args.student, holding, commit=(kind == "relabel"), teacher=args.teacher)
            labels_done = labels_done or kind == "relabel"
            print(json.dumps({"case": case, "code": "new", "student": args.student, "teacher": args.teacher, **res}),
                  flush=True)
            if old_root is not None and holding == "host":
                res = run_worker(old_root, root, kind, args.student, "default", teacher=args.teacher)
                print(json.dumps({"case": case, "code": f"old ({args.old})", "student": args.student, **res}),
                      flush=True)


if __name__ == "__main__":
    main()
