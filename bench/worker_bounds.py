"""Each worker kind's measured peak host memory against what `prism-ray plan` states as its bound (issue 18).

It writes an ImageNet-shaped image folder (bench/imagenet_shape.py) and runs recover, relabel and evaluate
through the CLI on a local Ray, one worker of `--cpus` CPUs at a time, with the shape of the run that found the
bound exceeded: random-weight ShuffleNetV2 x0.5 (primary) and MobileNetV3-small teachers, a ShuffleNetV2 x0.5
student, CPU workers, batches of `--group` classes, validation batches of `--val-batch`. Compute is cut (2
recover iterations, 1 student epoch), not memory. Per stage it prints the workers' peak RSS (each worker's own
VmHWM, DataLoader processes left out) and the bound `memory.worker_memory` gives, and writes them as JSON.

    python bench/worker_bounds.py --classes 1000 --res 224 --group 100     # the ImageNet shape (minutes)
    python bench/worker_bounds.py --classes 40 --res 112 --group 40        # what tests/test_worker_bounds.py runs
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

STAGES = {"recover/prism": "recover", "relabel": "relabel", "evaluate/diversity": "diversity"}


def overrides(data: Path, out: Path, classes: int, res: int, group: int, val_batch: int, cpus: int) -> list[str]:
    return [
        "run.name=bounds", f"run.output={out}", "run.stages=[recover, relabel, evaluate]",
        "data.dataset=image_folder", f"data.train={data / 'train'}", f"data.val={data / 'val'}",
        f"data.classes={classes}", f"data.resolution={res}", "data.index=",
        "teachers.models=[{name: t1, arch: shufflenet_v2_x0_5, weights: random}, "
        "{name: t2, arch: mobilenet_v3_small, weights: random}]",
        "recover.primary=t1", "recover.bn_pool=[t2]", "recover.ipc=1", f"recover.class_group={group}",
        "recover.iterations=2", "recover.schedule=flat", "recover.image_format=jpeg", "baselines.random_real=false",
        "baselines.recover={}",
        "relabel.teachers=[t1, t2]", "relabel.mix_group=50",
        "evaluate.students=[shufflenet_v2_x0_5]", "evaluate.seeds=[0]", "evaluate.epochs=1",
        f"evaluate.val_batch_size={val_batch}", "evaluate.diversity_network=t1",
        "ray.address=", "ray.workers=1", "ray.gpus_per_worker=0", f"ray.cpus_per_worker={cpus}", f"ray.num_cpus={cpus}",
        "storage.region=",
    ]


def measure(work: Path, classes: int, res: int, group: int, val_batch: int, cpus: int) -> dict:
    from imagenet_shape import generate

    from prism_ray.config_loader import load_config
    from prism_ray.memory import worker_memory

    data = work / "data"
    if not (data / "val").exists():
        generate(str(data), classes, {"train": 1, "val": 1}, size_range=(res + 16, res + 64), quiet=True)
    sets = overrides(data, work / "run", classes, res, group, val_batch, cpus)
    config = REPO / "jobs" / "configs" / "imagenet" / "resnet18.yaml"  # sized down by overrides()
    cfg = load_config(config, sets)
    bounds = {w.kind: w.host for w in worker_memory(cfg, classes)}
    cmd = [sys.executable, "-m", "prism_ray", "run", str(config),
           "--json", "--quiet", *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"the run failed:\n{done.stderr[-4000:]}")
    out = {"shape": {"classes": classes, "resolution": res, "class_group": group, "val_batch_size": val_batch,
                     "cpus_per_worker": cpus}, "kinds": {}}
    for report in json.loads(done.stdout):
        kind = STAGES.get(report["stage"]) or ("student" if report["stage"].startswith("evaluate") else None)
        if kind and report["worker_peak_rss"]:
            out["kinds"][kind] = {"peak": report["worker_peak_rss"], "bound": bounds[kind]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--group", type=int, default=100)
    p.add_argument("--val-batch", type=int, default=500)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--work", help="folder for the data and the run (default: a temporary one)")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="worker-bounds-") as tmp:
        result = measure(Path(args.work or tmp), args.classes, args.res, args.group, args.val_batch, args.cpus)
    for kind, f in result["kinds"].items():
        print(f"{kind:9s} peak {f['peak'] / 1e9:6.2f} GB   bound {f['bound'] / 1e9:6.2f} GB   "
              f"{'holds' if f['peak'] <= f['bound'] else 'EXCEEDED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
