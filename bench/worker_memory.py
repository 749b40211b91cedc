"""Where a relabel or diversity worker's memory goes, phase by phase, at ImageNet shape (issue 8).

The full-shape rehearsal reports each worker's lifetime peak (VmHWM) only: 10.9 GB for the relabel worker
that loaded three 7.5 GB sets in turn. This bench runs the same worker code in a fresh process on the same
shape (1000 classes, IPC 50, 224 px JPEGs, random-weight ShuffleNetV2 x0.5 teachers) and resets the peak
(`/proc/self/clear_refs`) before each phase, so each line says what one phase added:

  open        the worker built (torch, teachers)
  load SET    the set read, checksum-verified and decoded into its uint8 holding
  units SET   its relabel units (epochs x 50,000 rows of fp16 logits, written as Parquet, committed)
  drop SET    resident memory after the set is released (what a worker carries into the next set)
  diversity   a DiversityWorker scoring one set in batches of --val-batch (a fresh process)
  student     a StudentWorker's unit: one epoch of a ShuffleNetV2 x0.5 student on the first set with the
              labels relabel stored, then scoring 1,000 validation images (a fresh process)

Storage is a local folder, or a moto S3 server on 127.0.0.1 (--s3): the rehearsal's path, ranged GETs
through s3fs.

    python bench/worker_memory.py [--images 50000] [--sets 2] [--epochs 2] [--epochs-per-shard 2]
                                  [--teachers 1] [--val-batch 500] [--s3] [--keep DIR]
"""
from __future__ import annotations

import argparse
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
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

from image_sets import commit_set, jpeg, picture  # noqa: E402

CLASSES = 1000
SET_NAMES = ["prism", "sre2l", "random_real"]


def build(run_uri: str, storage_cfg: dict, data_root: Path, images: int, sets: int) -> dict:
    """One committed 224 px set, written under `sets` set names (same files), and one-image-per-class
    train and val ImageFolders (the workers read class names from them)."""
    from prism_ray.config import StorageConfig
    from prism_ray.storage import Storage

    g = np.random.default_rng(0)
    ipc = images // CLASSES
    total = commit_set(Storage(run_uri, StorageConfig(**storage_cfg)), SET_NAMES[:sets], CLASSES, ipc, g)
    for split in ("train", "val"):
        for c in range(CLASSES):
            path = data_root / split / f"c{c:04d}" / "0.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(picture(g, (320, 320)), 90))
    return {"images": ipc * CLASSES, "encoded_bytes_per_image": round(total / (ipc * CLASSES), 1)}


WORKER = r'''
import json, os, sys, time
import torch
from prism_ray.config_loader import config_from_dict
from prism_ray.stages.base import RunContext
from prism_ray.storage import Storage

args = json.loads(sys.argv[1])

def status():
    d = {}
    for line in open("/proc/self/status"):
        k = line.split(":")[0]
        if k in ("VmRSS", "VmHWM"):
            d[k] = int(line.split()[1]) * 1024
    return d

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    heap_max[0] = heap_bytes()

def heap_bytes():
    """Size of glibc's main heap (brk): where the main thread's allocations under the mmap threshold go."""
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            a, b = line.split()[0].split("-")
            return int(b, 16) - int(a, 16)
    return 0

heap_max = [0]

def watch_heap():
    while True:
        heap_max[0] = max(heap_max[0], heap_bytes())
        time.sleep(0.5)

import threading
threading.Thread(target=watch_heap, daemon=True).start()

def report(phase, t0, start_rss, **extra):
    s = status()
    print("PHASE " + json.dumps({"phase": phase, "seconds": round(time.perf_counter() - t0, 1),
                                  "rss_gb": round(s["VmRSS"] / 1e9, 2), "peak_gb": round(s["VmHWM"] / 1e9, 2),
                                  "peak_over_start_gb": round((s["VmHWM"] - start_rss) / 1e9, 2),
                                  "heap_max_gb": round(heap_max[0] / 1e9, 2), **extra}),
          flush=True)

names = [f"t{i}" for i in range(args["teachers"])]
raw = {
    "run": {"name": "bench", "output": args["run"], "seed": 0},
    "data": {"dataset": "image_folder", "train": args["data"] + "/train", "val": args["data"] + "/val",
             "channels": 3, "resolution": 224, "classes": 1000},
    "teachers": {"models": [{"name": n, "arch": "shufflenet_v2_x0_5", "weights": "random"} for n in names]},
    "recover": {"primary": names[0], "ipc": args["ipc"], "class_group": 100},
    "baselines": {"random_real": False},
    "relabel": {"mode": "stored", "teachers": names, "epochs": args["epochs"],
                "epochs_per_shard": args["epochs_per_shard"]},
    "evaluate": {"recipe": "prism", "students": ["shufflenet_v2_x0_5"], "seeds": [0], "epochs": 1,
                 "checkpoint_every": 1, "val_batch_size": args["val_batch"]},
    "storage": args["storage"],
    "ray": {"workers": 1, "cpus_per_worker": 2},
}
cfg = config_from_dict(raw)
storage = Storage(cfg.run.output, cfg.storage)
ctx = RunContext(1000, [f"c{i:04d}" for i in range(1000)], [1] * 1000)
torch.manual_seed(0)
sets = args["sets"]
if args["kind"] == "relabel":
    from prism_ray.stages.relabel import RelabelStage, label_shards
    reset_peak(); r0 = status()["VmRSS"]; t0 = time.perf_counter()
    stage = RelabelStage(cfg, storage, ctx)
    stage.prepare()  # the driver's part: the stage's generation and what it reads
    stage.bind()
    worker = stage.open_worker()
    report("open", t0, r0)
    for name in sets:
        reset_peak(); r0 = status()["VmRSS"]; t0 = time.perf_counter()
        s = worker.sets.get(name)
        report(f"load {name}", t0, r0, holding=s.holding, set_gb=round(s.images.nbytes / 1e9, 2))
        del s
        reset_peak(); r0 = status()["VmRSS"]; t0 = time.perf_counter()
        units = label_shards(cfg, name)
        shard_bytes = []
        for unit in units:
            computed = worker.compute(unit)
            shard_bytes.append(len(computed[0]))
            worker.commit(unit, computed)
            del computed
        report(f"units {name}", t0, r0, units=len(units), shard_mb=round(max(shard_bytes) / 1e6, 1))
        t0 = time.perf_counter()
        worker.sets.drop()
        report(f"drop {name}", t0, r0)
    stage.finalize()  # the labels' combined manifest: what students read them through
elif args["kind"] == "student":
    from prism_ray.stages.evaluate import StudentStage
    reset_peak(); r0 = status()["VmRSS"]; t0 = time.perf_counter()
    stage = StudentStage(cfg, storage, ctx)
    stage.prepare()
    stage.bind()
    worker = stage.open_worker()
    report("open student", t0, r0)
    unit = next(u for u in stage.units() if u.payload["set"] == sets[0])
    reset_peak(); r0 = status()["VmRSS"]; t0 = time.perf_counter()
    s = worker.sets.get(unit.payload["set"])
    report(f"load {sets[0]}", t0, r0, holding=s.holding)
    del s
    reset_peak(); r0 = status()["VmRSS"]; t0 = time.perf_counter()
    computed = worker.compute(unit)
    report(f"student {sets[0]}", t0, r0, val_batch=args["val_batch"], val_images=computed[1]["val_images"],
           train_seconds=round(computed[1]["train_seconds"], 1))
else:
    from prism_ray.stages.evaluate import DiversityStage
    reset_peak(); r0 = status()["VmRSS"]; t0 = time.perf_counter()
    stage = DiversityStage(cfg, storage, ctx)
    stage.prepare()
    stage.bind()
    worker = stage.open_worker()
    report("open diversity", t0, r0)
    unit = next(u for u in stage.units() if u.id == sets[0])
    reset_peak(); r0 = status()["VmRSS"]; t0 = time.perf_counter()
    s = worker.sets.get(unit.id)
    report(f"load {unit.id}", t0, r0, holding=s.holding)
    del s
    reset_peak(); r0 = status()["VmRSS"]; t0 = time.perf_counter()
    worker.compute(unit)
    report(f"diversity {unit.id}", t0, r0, val_batch=args["val_batch"])
'''


def run_worker(args: dict, env: dict) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], env=env, capture_output=True,
                         text=True, cwd=str(REPO))
    phases = [json.loads(l[len("PHASE "):]) for l in out.stdout.splitlines() if l.startswith("PHASE ")]
    if out.returncode:
        raise SystemExit(f"the {args['kind']} worker failed:\n{out.stderr[-3000:]}")
    return phases


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--sets", type=int, default=2, help="sets one relabel worker loads in turn (at most 3)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--epochs-per-shard", type=int, default=2)
    ap.add_argument("--teachers", type=int, default=1, help="ShuffleNetV2 x0.5 label teachers (the rehearsal: 4)")
    ap.add_argument("--val-batch", type=int, default=500, help="evaluate.val_batch_size: the diversity batch")
    ap.add_argument("--only", default="relabel,diversity,student")
    ap.add_argument("--s3", action="store_true", help="the run on a moto S3 server on 127.0.0.1")
    ap.add_argument("--keep", default=None, help="folder for the local data and run (reused when it exists)")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    moto = None
    with tempfile.TemporaryDirectory(prefix="prism-bench-memory-") as tmp:
        root = Path(args.keep or tmp)
        storage_cfg: dict = {}
        run_uri = str(root / "run")
        if args.s3:
            from rehearsal import start_moto
            moto, url = start_moto()
            env.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret",
                       AWS_DEFAULT_REGION="us-east-1")
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret")
            storage_cfg = {"endpoint_url": url, "region": "us-east-1"}
            import boto3
            boto3.client("s3", endpoint_url=url, region_name="us-east-1").create_bucket(Bucket="bench-run")
            run_uri = "s3://bench-run/run"
        try:
            if args.s3 or not (root / "run").exists():
                t0 = time.perf_counter()
                facts = build(run_uri, storage_cfg, root, args.images, args.sets)
                print(json.dumps({"case": "data", "storage": "s3" if args.s3 else "local", "sets": args.sets,
                                  **facts, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
            common = {"run": run_uri, "data": str(root), "storage": storage_cfg, "ipc": args.images // CLASSES,
                      "epochs": args.epochs, "epochs_per_shard": args.epochs_per_shard, "teachers": args.teachers,
                      "val_batch": args.val_batch, "sets": SET_NAMES[:args.sets]}
            for kind in args.only.split(","):  # student: one epoch on the labels relabel stored
                for phase in run_worker({**common, "kind": kind}, env):
                    print(json.dumps({"case": kind, "storage": "s3" if args.s3 else "local", **phase}), flush=True)
        finally:
            if moto is not None:
                moto.kill()


if __name__ == "__main__":
    main()
