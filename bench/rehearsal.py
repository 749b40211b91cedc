"""A full-shape rehearsal of ImageNet-1K IPC 50 on this machine: the real shape, tiny compute.

It makes an ImageNet-shaped data set (bench/imagenet_shape.py) in a moto S3 server (its own process, on
127.0.0.1), puts a request-counting proxy in front of it (tests/support/s3_proxy.py), and runs
jobs/configs/imagenet/resnet18.yaml stage by stage through the CLI, each stage a fresh driver on a local Ray
with 2 workers. Compute is made tiny by overrides: random-weight `probe` networks (one convolution) under
every teacher name and as the student, 1 recover iteration, 1 label and student epoch, one seed, scoring
batches of 100. Everything else keeps the real shape: 1000 classes, IPC 50, 224 px, 500 recover shards per method, three
sets (PRISM, SRe2L, random real), the four-teacher relabel ensemble, 10,000 validation images.

Per stage it prints wall time, the driver's and the workers' peak RSS (each process reports its own), the
S3 requests by kind on the data bucket and on the run bucket, and the files and bytes the stage wrote;
then the time of `plan`, `status` and a resume scan (the same run again, everything committed).

    python bench/rehearsal.py                  # the full shape (~1 h on 2 cores; `make rehearsal`)
    python bench/rehearsal.py --shape ci       # 1000 classes, IPC 1, 64 px: minutes (tests/test_rehearsal.py)
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from imagenet_shape import generate  # noqa: E402

from prism_ray.config import StorageConfig  # noqa: E402
from prism_ray.formatting import human_bytes  # noqa: E402
from prism_ray.storage import filesystem  # noqa: E402
from tests.support.s3_proxy import S3RequestCounter  # noqa: E402

CONFIG = REPO / "jobs" / "configs" / "imagenet" / "resnet18.yaml"
DATA_BUCKET, RUN_BUCKET = "imagenet-shaped", "prism-runs"
TEACHER_NAMES = ("resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet")
SMALL_ARCH = "probe"  # ~2.4 MFLOP per 224-px image: the data path, memory and storage are what is measured
STAGES = ("recover", "relabel", "evaluate")


@dataclass(frozen=True)
class Shape:
    classes: int
    train: int
    val: int
    sizes: tuple[int, int]
    resolution: int
    ipc: int
    baselines: bool  # the SRe2L and random-real sets too (three sets), or PRISM's alone
    verify: str  # data.verify


# The CI shape keeps ImageNet's class count (the listing, the index, 10 groups of 100 classes) and drops the
# baselines, which add nothing the PRISM set does not already exercise at that size but two thirds of the time.
# It decodes no image when listing: at full shape `auto` leaves the 52,000 train images undecoded, and at CI size
# decoding all 4,000 would be a third of the index step's time.
SHAPES = {"full": Shape(1000, 52, 10, (300, 500), 224, 50, True, "auto"),
          "ci": Shape(1000, 3, 1, (64, 96), 64, 1, False, "false")}


@dataclass
class Step:
    name: str
    seconds: float
    reports: list = field(default_factory=list)
    requests: dict = field(default_factory=dict)
    written: dict = field(default_factory=dict)
    driver_peak_rss: int = 0
    returncode: int = 0
    error: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process (it holds every object in memory: keep it out of the drivers)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the moto S3 server did not start")


def overrides(shape: Shape, proxy_url: str) -> list[str]:
    teachers = ", ".join(f"{{name: {n}, arch: {SMALL_ARCH}, weights: random}}" for n in TEACHER_NAMES)
    sets = [
        f"run.output=s3://{RUN_BUCKET}/in1k-rehearsal",
        f"data.train=s3://{DATA_BUCKET}/imagenet/train", f"data.val=s3://{DATA_BUCKET}/imagenet/val",
        f"data.classes={shape.classes}", f"data.resolution={shape.resolution}", f"data.verify={shape.verify}",
        f"storage.endpoint_url={proxy_url}", "storage.region=us-east-1",
        f"teachers.models=[{teachers}]",
        f"recover.ipc={shape.ipc}", "recover.iterations=1", "recover.schedule=flat",
        *(["baselines.recover={sre2l: {preset: sre2l, iterations: 1}}"] if shape.baselines else
          ["baselines.recover={}", "baselines.random_real=false"]),
        "evaluate.epochs=1", "evaluate.seeds=[0]", f"evaluate.students=[{SMALL_ARCH}]", "evaluate.checkpoint_every=1",
        # scoring and diversity batches of 100, not 500: a float32 batch of 500 at 224 px is 0.3 GB, and a
        # worker with one loader process has ~3 in flight; on CPU workers the network's activations on them
        # are host memory too (1.6 GB at 500 for ShuffleNetV2 x0.5, bench/worker_memory.py)
        "evaluate.val_batch_size=100",
        "ray.address=", "ray.workers=2", "ray.gpus_per_worker=0", "ray.cpus_per_worker=1",
    ]
    return [x for s in sets for x in ("--set", s)]


def env() -> dict:
    e = dict(os.environ)
    e.update(AWS_ACCESS_KEY_ID="rehearsal", AWS_SECRET_ACCESS_KEY="rehearsal-secret", AWS_DEFAULT_REGION="us-east-1",
             RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    e.pop("AWS_ENDPOINT_URL", None)
    return e


def prism_ray(args: list[str], log: Path) -> tuple[int, float, str, int]:
    """Run the CLI; (exit code, seconds, stdout, peak RSS as the kernel counted it: the process and every
    descendant it waited for, so Ray's workers too when it started a local Ray; a stage's reports carry the
    driver's own figure)."""
    t0 = time.perf_counter()
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "prism_ray", *args], stdout=subprocess.PIPE, stderr=err,
                                env=env(), cwd=REPO)
        out = proc.stdout.read().decode()
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code, time.perf_counter() - t0, out, usage.ru_maxrss * 1024


def written(fs, prefix: str) -> dict:
    """Files and bytes under a run prefix (listed directly on moto, not through the counting proxy)."""
    try:
        sizes = fs.du(prefix, total=False)
    except FileNotFoundError:
        return {"files": 0, "bytes": 0}
    return {"files": len(sizes), "bytes": int(sum(sizes.values()))}


def rehearse(shape_name: str, work: Path, quiet: bool = False) -> dict:
    shape = SHAPES[shape_name]
    work.mkdir(parents=True, exist_ok=True)
    log = work / "drivers.log"
    log.write_text("")
    moto, moto_url = start_moto()
    proxy = S3RequestCounter(moto_url).start()
    out: dict = {"shape": shape.__dict__, "steps": []}
    try:
        direct = StorageConfig(endpoint_url=moto_url, region="us-east-1")
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "rehearsal")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rehearsal-secret")
        fs, _ = filesystem(f"s3://{DATA_BUCKET}", direct)
        import boto3
        client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1")
        for bucket in (DATA_BUCKET, RUN_BUCKET):
            client.create_bucket(Bucket=bucket)
        data = generate(f"s3://{DATA_BUCKET}/imagenet", shape.classes, {"train": shape.train, "val": shape.val},
                        shape.sizes, storage=direct, quiet=quiet)
        out["data"] = data
        say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
        say(f"data: {data['files']:,} images, {human_bytes(data['bytes'])} in {data['seconds']:.0f} s")
        base = [str(CONFIG), *overrides(shape, proxy.url)]
        run_uri = f"s3://{RUN_BUCKET}/in1k-rehearsal"

        def step(name: str, args: list[str], prefixes: tuple[str, ...] = ()) -> Step:
            proxy.reset()
            code, seconds, stdout, kernel_rss = prism_ray(args, log)
            s = Step(name, seconds, returncode=code, driver_peak_rss=kernel_rss,
                     requests={"data": proxy.counts(DATA_BUCKET), "run": proxy.counts(RUN_BUCKET)})
            if "--json" in args and stdout.strip().startswith("["):
                s.reports = json.loads(stdout)
            if code != 0:
                s.error = log.read_text().strip().splitlines()[-1] if log.read_text().strip() else f"exit {code}"
            s.written = {p: written(fs, f"{RUN_BUCKET}/in1k-rehearsal/{p}") for p in prefixes}
            out["steps"].append(s.__dict__)
            say(f"{name}: exit {code}, {seconds:.0f} s, requests {s.requests}")
            return s

        step("index (the driver lists the data, once per run)", ["index", *base], ("data",))
        for stage in STAGES:
            sets = ("recover/prism", "recover/sre2l", "recover/random_real") if shape.baselines else ("recover/prism",)
            prefixes = {"recover": sets,
                        "relabel": ("relabel",), "evaluate": ("evaluate/students", "evaluate/diversity", "report")}
            s = step(stage, [stage, *base, "--json"], prefixes[stage])
            if s.returncode != 0:
                break
        step("plan", ["plan", *base])
        step("status", ["status", run_uri, "--endpoint-url", proxy.url, "--json"])
        step("resume scan (run, all committed)", ["run", *base, "--json"])
    finally:
        proxy.stop()
        moto.kill()
        moto.wait()
    (work / f"rehearsal-{shape_name}.json").write_text(json.dumps(out, indent=2))
    return out


def table(result: dict) -> str:
    shape = result["shape"]
    set_bytes = shape["classes"] * shape["ipc"] * 3 * shape["resolution"] ** 2
    lines = [f"Shape: {shape['classes']} classes, IPC {shape['ipc']}, {shape['resolution']} px, "
             f"{shape['train']} train + {shape['val']} val images per class; one uint8 set = "
             f"{human_bytes(set_bytes)}", "",
             "| step | wall | driver peak RSS | worker peak RSS | data bucket LIST / GET | run bucket LIST / GET / "
             "HEAD / PUT | written |", "|---|---|---|---|---|---|---|"]
    for s in result["steps"]:
        d, r = s["requests"]["data"], s["requests"]["run"]
        workers = max((rep.get("worker_peak_rss", 0) for rep in s["reports"]), default=0)
        driver = max((rep.get("driver_peak_rss", 0) for rep in s["reports"]), default=0) or s["driver_peak_rss"]
        files = sum(w["files"] for w in s["written"].values())
        size = sum(w["bytes"] for w in s["written"].values())
        wrote = f"{files:,} files, {human_bytes(size)}" if s["written"] else ""
        status = "" if s["returncode"] == 0 else f" (exit {s['returncode']}: {s['error'][:80]})"
        lines.append(f"| {s['name']}{status} | {s['seconds']:.0f} s | {human_bytes(driver)} | "
                     f"{human_bytes(workers) if workers else '-'} | {d['LIST']} / {d['GET']} | "
                     f"{r['LIST']} / {r['GET']} / {r['HEAD']} / {r['PUT']} | {wrote} |")
        for rep in s["reports"]:
            lines.append(f"| &nbsp;&nbsp;{rep['stage']} | {rep['seconds']:.0f} s | | "
                         f"{human_bytes(rep.get('worker_peak_rss', 0)) if rep.get('worker_peak_rss') else '-'} | | | "
                         f"{rep['ran']} units |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="full")
    p.add_argument("--work", default=str(REPO / "bench" / "results"), help="folder for the JSON and the drivers' log")
    a = p.parse_args()
    result = rehearse(a.shape, Path(a.work))
    print(table(result))


if __name__ == "__main__":
    main()
