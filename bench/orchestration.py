"""Orchestration at the ImageNet shape: 500 recover shards of a stand-in through the real dispatch loop.

The stand-in is a Stage (the real plan: 50 IPC x 10 groups of 100 classes) whose worker sleeps for a fixed
shard time, a compute that needs no CPU, so that the 2-core machine does not hide scaling, and then
commits like recover does: 100 JPEGs of 224 px (encoded once per worker, real sizes) and the Parquet
manifest, through ShardStore, to a local folder or to S3 (a moto server in its own process on 127.0.0.1).
It runs through `run_stage_ray(stage, cfg.ray)`, whatever that loop does inside.

Measured per storage and worker count W, with n = 100 and n = 500 shards of time t (local: W = 1, 2, 4 at
t = 0.2 s; S3: W = 4 at t = 1 s, where this machine's moto server is the bottleneck, and again at t = 3 s
with 20 and 60 shards, where it is not):
    T(n) = a + (n / W) * (t + o)
a is the fixed cost (starting W actors, the stage's combined manifest at the end) and o the overhead per
shard (driver round trip, bookkeeping, whatever of the commit is not hidden behind the next shard's compute).
The overhead for 10 s shards is o / 10 s (o does not grow with t while a commit fits inside one shard);
scaling efficiency E(W) = T_1 / (W * T_W), measured at t and extrapolated to 10 s shards with the fitted
a and o. The commit itself (seconds per shard, one process) is measured apart.

Usage: python bench/orchestration.py [--shard-seconds 0.2] [--s3-shard-seconds 1.0] [--workers 1,2,4]
                                     [--storage local,s3] [--out bench/results/orchestration.json]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from _common import default_out, machine, table, write_json

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray swaps 127.0.0.1 for the interface address unless told not to (RAY_NOTES.md); read at import time
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from prism_ray.algo.encode import encode_pixels  # noqa: E402
from prism_ray.config_loader import config_from_dict  # noqa: E402
from prism_ray.stages.base import RunContext, Stage, Unit, Worker  # noqa: E402
from prism_ray.stages.recover import IMAGE_SCHEMA, image_path, plan_shards  # noqa: E402
from prism_ray.storage import Storage  # noqa: E402

TARGET_SHARD_SECONDS = 10.0


def standin_jpegs(count: int, resolution: int, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEGs of synthetic-image size: smooth noise plus fine noise, quality 75."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, resolution // 8, resolution // 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(resolution, resolution), mode="bilinear")
    pixels = (smooth * 0.8 + torch.rand(count, 3, resolution, resolution, generator=g) * 0.2) * 255
    return [encode_pixels(p.round().to(torch.uint8), "jpeg", 75) for p in pixels]


class StandInWorker(Worker):
    def __init__(self, stage: "StandInStage"):
        self.stage = stage
        self.blobs = standin_jpegs(stage.images, stage.resolution)

    def compute(self, unit: Unit):
        time.sleep(self.stage.shard_seconds)  # the GPU's work, without using a CPU
        k = unit.payload["ipc_index"]
        return [{"class_id": c, "ipc_index": k, "seed": 0, "primary_teacher": "standin", "bn_teachers": [],
                 "bn_teacher_usage": "{}", "iterations": 0, "loss_ce": 0.0, "loss_bn": 0.0,
                 "seconds": self.stage.shard_seconds / len(unit.payload["class_ids"]), "source_index": None}
                for c in unit.payload["class_ids"][: self.stage.images]]

    def commit(self, unit: Unit, rows) -> dict:
        outputs = [(image_path(r["class_id"], r["ipc_index"], "jpg"), self.blobs[i]) for i, r in enumerate(rows)]
        res = self.stage.store.commit(unit.id, outputs, rows, schema=IMAGE_SCHEMA)
        return {"images": len(outputs), "committed": res.committed}


class StandInStage(Stage):
    """Recover's shard plan and commit, with a compute that sleeps for `shard_seconds`."""

    kind = "recover"

    def __init__(self, cfg, storage, context, shards: int, shard_seconds: float, images: int, resolution: int):
        super().__init__(cfg, storage, context)
        self.shards, self.shard_seconds, self.images, self.resolution = shards, shard_seconds, images, resolution

    @property
    def prefix(self) -> str:
        return "recover/standin"

    def units(self) -> list[Unit]:
        groups = -(-self.context.num_classes // 100)
        return plan_shards(self.context.num_classes, -(-self.shards // groups), 100)[: self.shards]

    def images_per_unit(self, unit: Unit) -> int:
        return self.images

    def fingerprint(self) -> dict:
        return {"standin": self.shard_seconds, "images": self.images}

    def open_worker(self) -> Worker:
        return StandInWorker(self)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """A moto S3 server in its own process (its request handling must not share the driver's GIL)."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").list_buckets()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_stage(output: str, endpoint: str | None, workers: int, shards: int, t: float, images: int,
               resolution: int) -> StandInStage:
    cfg = config_from_dict({
        "run": {"name": "bench-orch", "output": output, "stages": ["recover"]},
        "ray": {"workers": workers, "cpus_per_worker": 1, "in_flight_per_worker": 2, "max_attempts": 1},
        "storage": {"endpoint_url": endpoint, "region": "us-east-1"} if endpoint else {},
    })
    storage = Storage(output, cfg.storage)
    context = RunContext(1000, [f"c{i}" for i in range(1000)], [1300] * 1000)
    stage = StandInStage(cfg, storage, context, shards, t, images, resolution)
    stage.prepare()
    return stage


def run_once(base: str, endpoint: str | None, workers: int, shards: int, t: float, images: int,
             resolution: int) -> float:
    """Wall seconds of one stage run through the dispatch loop (progress lines silenced)."""
    from prism_ray.orchestration.dispatch import run_stage_ray

    output = f"{base}/{uuid.uuid4().hex[:8]}"
    stage = make_stage(output, endpoint, workers, shards, t, images, resolution)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        report = run_stage_ray(stage, stage.cfg.ray)
    wall = time.perf_counter() - t0
    if not report.complete or report.ran != shards:
        raise RuntimeError(f"stand-in stage did not complete: {report.to_json()}")
    if not output.startswith("s3://"):
        shutil.rmtree(output, ignore_errors=True)
    return wall


def commit_seconds(base: str, endpoint: str | None, images: int, resolution: int, count: int = 10) -> float:
    """Seconds to commit one shard (100 JPEG writes + manifest), one after another in this process."""
    stage = make_stage(f"{base}/{uuid.uuid4().hex[:8]}", endpoint, 1, count, 0.0, images, resolution)
    worker = stage.open_worker()
    units = stage.units()
    rows = [worker.compute(u) for u in units]
    t0 = time.perf_counter()
    for u, r in zip(units, rows):
        worker.commit(u, r)
    return (time.perf_counter() - t0) / count


def fit(t_small: float, t_large: float, n_small: int, n_large: int, workers: int, t: float) -> tuple[float, float]:
    """(a, o) of T(n) = a + (n / W)(t + o) through two runs."""
    per = (t_large - t_small) * workers / (n_large - n_small)
    return t_large - n_large / workers * per, per - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=500)
    ap.add_argument("--small", type=int, default=100, help="shards of the second run (fixed-cost fit)")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--shard-seconds", type=float, default=0.2, help="stand-in shard time, local storage")
    ap.add_argument("--s3-shard-seconds", type=float, default=1.0,
                    help="stand-in shard time on S3 (moto on this 2-core machine needs ~0.5 s per 101-object commit)")
    ap.add_argument("--s3-check-seconds", type=float, default=3.0,
                    help="s3-unsaturated: a shard time at which the commits stay below what moto serves here")
    ap.add_argument("--s3-check-shards", default="20,60", help="s3-unsaturated: the two shard counts of the fit")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--storage", default="local,s3,s3-unsaturated")
    ap.add_argument("--out", default=str(default_out("orchestration")))
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    kinds = args.storage.split(",")

    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=max(8, 2 * max(workers)),
             include_dashboard=False, log_to_driver=False)
    runs, fits, commits = [], [], {}
    try:
        for kind in kinds:
            with contextlib.ExitStack() as stack:
                counts = (args.small, args.shards)
                if kind.startswith("s3"):
                    endpoint, base, t = stack.enter_context(moto_server()), "s3://bench/orch", args.s3_shard_seconds
                    wlist = [max(workers)]
                    if kind == "s3-unsaturated":
                        t = args.s3_check_seconds
                        counts = tuple(int(c) for c in args.s3_check_shards.split(","))
                else:
                    endpoint, t, wlist = None, args.shard_seconds, workers
                    base = stack.enter_context(tempfile.TemporaryDirectory(prefix="prism-orch-"))
                commits[kind] = commit_seconds(base, endpoint, args.images, args.resolution)
                for w in wlist:
                    walls = {}
                    for n in counts:
                        walls[n] = run_once(base, endpoint, w, n, t, args.images, args.resolution)
                        runs.append({"storage": kind, "workers": w, "shards": n, "shard_s": t, "wall_s": walls[n],
                                     "overhead_pct": 100 * (walls[n] * w / n - t) / t})
                        print(f"{kind}: {w} workers, {n} shards of {t} s: {walls[n]:.1f} s", file=sys.stderr,
                              flush=True)
                    a, o = fit(walls[counts[0]], walls[counts[1]], counts[0], counts[1], w, t)
                    fits.append({"storage": kind, "workers": w, "shard_s": t, "fixed_s": a, "per_shard_overhead_s": o,
                                 "overhead_pct_at_t": 100 * o / t,
                                 "overhead_pct_10s": 100 * o / TARGET_SHARD_SECONDS})
    finally:
        ray.shutdown()

    local = {f["workers"]: f for f in fits if f["storage"] == "local"}
    scaling = []
    if 1 in local:
        n = args.shards
        for w, f in sorted(local.items()):
            measured = next(r["wall_s"] for r in runs if r["storage"] == "local" and r["workers"] == w
                            and r["shards"] == n)
            t1 = next(r["wall_s"] for r in runs if r["storage"] == "local" and r["workers"] == 1 and r["shards"] == n)
            f1 = local[1]
            at10 = lambda f_, w_: f_["fixed_s"] + n / w_ * (TARGET_SHARD_SECONDS + f_["per_shard_overhead_s"])  # noqa: E731
            scaling.append({"workers": w, "wall_s": measured, "efficiency": t1 / (w * measured),
                            "efficiency_10s_shards": at10(f1, 1) / (w * at10(f, w)),
                            "throughput_efficiency": (args.shard_seconds + f1["per_shard_overhead_s"])
                            / (args.shard_seconds + f["per_shard_overhead_s"])})
    result = {"bench": "orchestration", "machine": machine(),
              "setup": {"shards": args.shards, "small_run_shards": args.small, "images_per_shard": args.images,
                        "resolution": args.resolution, "local_shard_s": args.shard_seconds,
                        "s3_shard_s": args.s3_shard_seconds, "in_flight_per_worker": 2,
                        "jpeg_bytes_per_image": len(standin_jpegs(1, args.resolution)[0])},
              "commit_s_per_shard": commits, "runs": runs, "fits": fits, "scaling_local": scaling}
    out = write_json(args.out, result)
    print(f"orchestration: {args.shards} stand-in shards of {args.images} JPEGs at {args.resolution} px through "
          f"run_stage_ray ({result['machine']['cpu']}, {result['machine']['cores']} cores)\n")
    print(table([{"storage": k, "commit_s_per_shard": v} for k, v in commits.items()],
                ["storage", "commit_s_per_shard"]))
    print()
    print(table(runs, ["storage", "workers", "shards", "shard_s", "wall_s", "overhead_pct"]))
    print()
    print(table(fits, ["storage", "workers", "shard_s", "fixed_s", "per_shard_overhead_s", "overhead_pct_at_t",
                       "overhead_pct_10s"]))
    if scaling:
        print()
        print(table(scaling, ["workers", "wall_s", "efficiency", "throughput_efficiency", "efficiency_10s_shards"]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
