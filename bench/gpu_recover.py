"""Recover on one GPU at the ImageNet shape, in every precision and compile mode, in one command.

    python bench/gpu_recover.py --out DIR            # ~5 minutes on one H200-class GPU (--budget-s)
    python bench/gpu_recover.py --out DIR --tiny     # seconds on a CPU: the same code at toy sizes

Shards of 100 images at 224 px, resnet18 primary with the reference BN pool (mobilenet_v2, efficientnet_b0,
shufflenet_v2_x0_5, alexnet), random weights. Each variant runs in its own process (clean peak memory and
compile caches): the engine in fp32; in bf16 autocast + channels_last (the engine's CUDA default); the
same under torch.compile; under torch.compile with CUDA graphs (mode reduce-overhead); the reference-style
loop (bench/reference_loop.py: fp32, primary twice, teachers rebuilt per IPC index); and two shards at
once on the one GPU (two processes, the fastest engine variant measured before it).

Per variant: ms per step of the primary alone and of each pool member added (from runs of n1 and n2
steps, so setup cancels), the expected step under the reference's draw (3 slots at 0.5: each member in
37.5% of shards; alexnet has no BN and the engine never runs it), seconds per image at the reference's
mean iteration count (2,250 = mean of 4000 - 500 (k % 8)), achieved TFLOP/s from FlopCounterMode counts
(forward + backward to the input per teacher run) and its fraction of the GPU's dense bf16 peak, peak
GPU memory, and host-device synchronisations per step (torch.cuda sync debug mode; should be 0).

"Close" for bf16 (checked on one shard of --check-iters steps run in fp32 and in bf16, same seed):
  1. honest loss: at the bf16 run's final images, the loss computed in bf16 (autocast, bf16 weights) is
     within 2% of the loss computed in fp32 (same images, fp32 teachers), for CE and BN terms each;
  2. as good: the bf16 run's final images score under the fp32 objective within 5% (+0.01) of the fp32
     run's final images;
  images: mean |difference| in 8-bit levels and ||x_bf16 - x_fp32|| / ||x_fp32 - x_init|| are reported.
Writes DIR/gpu_recover.json (the numbers, and `efficiency.recover` that `prism-ray plan` reads) and
DIR/gpu_recover.md (the tables). Exit status 0 when every variant that ran finished, 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _common import bf16_peak, known_gpu, machine, table, write_json

import torch  # noqa: E402

from prism_ray.algo.bn_loss import average_bn_loss  # noqa: E402
from prism_ray.algo.encode import to_uint8  # noqa: E402
from prism_ray.algo.schedule import iterations_for  # noqa: E402
from prism_ray.algo.seeding import derive_seed, generator  # noqa: E402
from prism_ray.algo.synthesize import ShardSpec, TeacherSet, synthesize_shard  # noqa: E402
from prism_ray.algo.teachers import ModelShape, build_model, freeze, has_batchnorm  # noqa: E402
from prism_ray.config import RecoverConfig  # noqa: E402
from prism_ray.data.base import IMAGENET_STATS, Normalization  # noqa: E402

HERE = Path(__file__).resolve()
PRIMARY = "resnet18"
POOL = ["mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet"]
MEAN_ITERATIONS = sum(iterations_for(k, 4000, "cyclic", 500, 8) for k in range(8)) / 8
SIZES = {  # images per shard, resolution, classes, n1 / n2 steps per timing, closeness steps, concurrent shards
    "full": dict(images=100, resolution=224, classes=1000, n1=5, n2=25, check_iters=300, conc_shards=3),
    "tiny": dict(images=2, resolution=32, classes=10, n1=1, n2=3, check_iters=4, conc_shards=1),
}
ENGINE_VARIANTS = {  # name: (amp, channels_last, compile mode or None)
    "fp32": (False, False, None),
    "bf16_cl": (True, True, None),
    "bf16_cl_compile": (True, True, "default"),
    "bf16_cl_cudagraphs": (True, True, "reduce-overhead"),
}


# ------------------------------------------------------------------------------------------------ child side


def recover_cfg(iterations: int, **kw) -> RecoverConfig:
    base = dict(primary=PRIMARY, bn_pool=list(POOL), selection="pre", slots=3, slot_prob=0.5, init="noise",
                iterations=iterations, schedule="flat", image_format="jpeg")
    return RecoverConfig(**{**base, **kw})


def build_pool(shape: ModelShape, device: torch.device) -> dict:
    return {n: freeze(build_model(n, shape, seed=derive_seed(0, "gpu-bench", n))).to(device) for n in [PRIMARY, *POOL]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_shard(teachers, spec: ShardSpec, cfg: RecoverConfig, norm, shape, device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    # the config's precision and layout must be the TeacherSet's (synthesize_shard checks them)
    cfg = dataclasses.replace(cfg, precision="bf16" if teachers.amp else "fp32", channels_last=teachers.channels_last)
    result = synthesize_shard(teachers, spec, cfg, norm, device=device,
                              shape=(shape.in_channels, shape.resolution, shape.resolution))
    sync(device)
    return time.perf_counter() - t0, result


def step_ms(run, n1: int, n2: int) -> float:
    """ms per step from two runs of n1 and n2 steps: the shard's setup and copies cancel."""
    return 1000 * (run(n2) - run(n1)) / (n2 - n1)


def objective(teachers: TeacherSet, x: torch.Tensor, targets: torch.Tensor, cfg: RecoverConfig, names) -> dict:
    """CE of the primary and the averaged BN loss of `names` on the images themselves (no crop), no gradient."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=teachers.amp):
        xin = x.contiguous(memory_format=torch.channels_last) if teachers.channels_last else x
        logits, primary_bn = teachers.forward(PRIMARY, xin)
        per = {PRIMARY: primary_bn}
        for n in names:
            if n != PRIMARY:
                per[n] = teachers.forward(n, xin)[1] if teachers.has_bn(n) else None
    ce = torch.nn.functional.cross_entropy(logits.float(), targets).item()
    bn = average_bn_loss(per, cfg.bn_average)
    return {"ce": ce, "bn": float(bn) if bn is not None else 0.0}


def channel_stats_check(device: torch.device) -> dict:
    """The engine's BN statistics on this device against float64 var_mean of the same (rounded) input:
    largest relative error of variance, mean and input gradient, per dtype and memory format."""
    from prism_ray.algo.bn_loss import channel_stats

    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 64, 28, 28, generator=g) * 2 + 0.5
    gv, gm = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    out = {}
    for dtype, fmt in ((torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last),
                       (torch.float16, torch.contiguous_format)):
        x = base.to(device, dtype).contiguous(memory_format=fmt).requires_grad_(True)
        ref = x.detach().double().requires_grad_(True)
        rv, rm = torch.var_mean(ref, dim=[0, 2, 3], correction=0)
        ((rv * gv.to(device)).sum() + (rm * gm.to(device)).sum()).backward()
        v, m = channel_stats(x)
        ((v.double() * gv.to(device)).sum() + (m.double() * gm.to(device)).sum()).backward()
        rel = lambda a, b: float(((a.double() - b).abs().max() / b.abs().max()).item())  # noqa: E731
        out[f"{str(dtype).split('.')[-1]}/{'channels_last' if fmt == torch.channels_last else 'nchw'}"] = {
            "var": rel(v, rv.detach()), "mean": rel(m, rm.detach()), "grad": rel(x.grad, ref.grad)}
    return out


def child_engine(opts: dict) -> dict:
    size = SIZES[opts["size"]]
    amp, channels_last, mode = ENGINE_VARIANTS[opts["variant"]]
    device = torch.device(opts["device"])
    # the bf16 variants are GPU variants: a CPU dry run computes them in fp32 (the engine would honour bf16 on
    # a CPU too, as recover.precision does; bench/bf16_effect.py measures what that changes)
    amp = amp and device.type == "cuda"
    shape = ModelShape(size["classes"], 3, size["resolution"])
    norm = Normalization(*IMAGENET_STATS)
    pool = build_pool(shape, device)
    compile_kw = None
    if mode is not None:
        compile_kw = {"backend": opts["compile_backend"]}
        if mode != "default":
            compile_kw["mode"] = mode
    teachers = TeacherSet(pool, device, amp=amp, channels_last=channels_last, compile=compile_kw)
    classes = tuple(range(size["images"]))
    spec = lambda k: ShardSpec(f"ipc{k:04d}", k, classes, derive_seed(0, "gpu-bench-shard", k))  # noqa: E731
    bn_pool = [n for n in POOL if has_batchnorm(pool[n])]
    out: dict = {"variant": opts["variant"], "amp_effective": teachers.amp,
                 "channels_last_effective": teachers.channels_last, "compile": compile_kw}
    run = lambda cfg, k=0: timed_shard(teachers, spec(k), cfg, norm, shape, device)  # noqa: E731

    t0 = time.perf_counter()
    run(recover_cfg(2, selection="fixed", fixed=bn_pool))  # warm-up: cuDNN autotune, compile of every teacher
    out["warmup_s"] = time.perf_counter() - t0
    n1, n2 = size["n1"], size["n2"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tasks = opts["tasks"]
    if "members" in tasks:
        base = step_ms(lambda n: run(recover_cfg(n, selection="fixed", fixed=[]))[0], n1, n2)
        members = {PRIMARY: base}
        for name in POOL:
            members[name] = step_ms(lambda n: run(recover_cfg(n, selection="fixed", fixed=[name]))[0], n1, n2) - base
        out["members_ms"] = members
        out["all_members_ms"] = step_ms(lambda n: run(recover_cfg(n, selection="fixed", fixed=bn_pool))[0], n1, n2)
    if "pre" in tasks:  # one sampled shard with the reference's draw
        cfg = recover_cfg(n2)
        seconds, res = run(cfg, 3)
        out["pre_shard"] = {"iterations": n2, "seconds": seconds, "teachers": res.records[0].bn_teachers}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    if "sync" in tasks and device.type == "cuda":
        counts = []
        for n in (n1, n2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    run(recover_cfg(n, selection="fixed", fixed=bn_pool))
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts.append(sum("synchroniz" in str(w.message).lower() for w in caught))
        out["syncs"] = {"shard_n1": counts[0], "shard_n2": counts[1], "per_step": (counts[1] - counts[0]) / (n2 - n1)}
    if "closeness" in tasks:
        cfg = recover_cfg(size["check_iters"])
        sp = spec(7)
        x0 = torch.randn((len(classes), 3, shape.resolution, shape.resolution), generator=generator(sp.seed, "init"))
        _, res = run(cfg, 7)
        names = res.records[0].bn_teachers
        x = res.images.to(device)
        targets = torch.tensor(classes, device=device)
        teachers.close()  # evaluation runs eager teacher sets; hooks of two sets on one model would mix
        evals = {}
        for key, (a, c) in (("fp32", (False, False)), ("own", (amp, channels_last))):
            plain = TeacherSet(pool, device, amp=a, channels_last=c)
            try:
                evals[key] = objective(plain, x, targets, cfg, names)
            finally:
                plain.close()
        torch.save({"images": res.images, "init": x0, "history": res.history, "evals": evals, "teachers": names},
                   opts["check_file"])
        out["closeness_file"] = opts["check_file"]
        if device.type == "cuda":
            out["channel_stats_check"] = channel_stats_check(device)
    if "concurrent" in tasks:
        ready = Path(opts["wait_dir"])
        (ready / f"ready-{opts['tag']}").touch()
        while not (ready / "go").exists():
            time.sleep(0.01)
        start = time.time()
        for k in range(size["conc_shards"]):
            run(recover_cfg(n2), 20 + k)
        out["concurrent"] = {"start": start, "end": time.time(), "images": size["conc_shards"] * len(classes)}
        if device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    teachers.close()
    return out


def child_reference(opts: dict) -> dict:
    from reference_loop import reference_shard, save_weights

    size = SIZES[opts["size"]]
    device = torch.device(opts["device"])
    shape = ModelShape(size["classes"], 3, size["resolution"])
    pool = {n: m.cpu() for n, m in build_pool(shape, torch.device("cpu")).items()}
    folder = tempfile.mkdtemp(prefix="prism-gpu-bench-")
    weights = save_weights(pool, folder)
    classes = tuple(range(size["images"]))
    sp = ShardSpec("ref", 0, classes, derive_seed(0, "gpu-bench-shard", 0))
    cfg = recover_cfg(size["n2"])
    mean, std = IMAGENET_STATS
    loads = []

    def run(extras, n):
        out = reference_shard(weights, PRIMARY, extras, sp, cfg, mean, std, shape, device, iterations=n)
        loads.append(out["seconds"]["load"])
        return out["seconds"]["steps"]

    n1, n2 = size["n1"], size["n2"]
    run(POOL, 1)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = step_ms(lambda n: run([], n), n1, n2)
    members = {PRIMARY: base}
    for name in POOL:
        members[name] = step_ms(lambda n: run([name], n), n1, n2) - base
    out = {"variant": "reference_fp32", "members_ms": members, "rebuild_s": loads}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    for f in Path(folder).iterdir():
        f.unlink()
    os.rmdir(folder)
    return out


# ----------------------------------------------------------------------------------------------- parent side


def spawn(opts: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), "--child", json.dumps(opts)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def collect(proc: subprocess.Popen, timeout: float) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"stopped after {timeout:.0f} s (budget)"}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1][len("RESULT "):])


def expected(members: dict, p_member: float, engine: bool, pool_bn: dict) -> float:
    """Expected ms per step under the reference's draw (the engine never runs a BN-free member)."""
    extras = sum(v for n, v in members.items() if n != PRIMARY and (pool_bn[n] or not engine))
    return members[PRIMARY] + p_member * extras


def closeness(fp32_file: str, other_file: str, norm: Normalization) -> dict:
    a, b = torch.load(fp32_file), torch.load(other_file)
    x32, x16, x0 = a["images"], b["images"], a["init"]
    levels = (to_uint8(x16, norm).int() - to_uint8(x32, norm).int()).abs().float()
    honest = {k: abs(b["evals"]["own"][k] - b["evals"]["fp32"][k]) / max(abs(b["evals"]["fp32"][k]), 1e-6)
              for k in ("ce", "bn")}
    as_good = {k: b["evals"]["fp32"][k] <= 1.05 * a["evals"]["fp32"][k] + 0.01 for k in ("ce", "bn")}
    hist = {k: [abs(u - v) / max(abs(v), 1e-6) for u, v in zip(b["history"][k], a["history"][k])]
            for k in ("loss", "loss_ce", "loss_bn")}
    return {
        "honest_loss_rel_diff": honest, "honest_loss_ok": all(v <= 0.02 for v in honest.values()),
        "fp32_objective_of_fp32_images": a["evals"]["fp32"], "fp32_objective_of_these_images": b["evals"]["fp32"],
        "as_good_ok": all(as_good.values()),
        "max_rel_diff_along_history": {k: max(v) for k, v in hist.items()},
        "image_mean_abs_levels": float(levels.mean()), "image_share_over_4_levels": float((levels > 4).float().mean()),
        "image_rel_deviation": float((x16 - x32).norm() / (x32 - x0).norm().clamp_min(1e-12)),
        "close": all(v <= 0.02 for v in honest.values()) and all(as_good.values()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for gpu_recover.json and gpu_recover.md")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a CPU test of the whole script)")
    ap.add_argument("--budget-s", type=float, default=290.0, help="stop starting variants after this")
    ap.add_argument("--variants", default="fp32,bf16_cl,reference_fp32,concurrent,bf16_cl_compile,bf16_cl_cudagraphs")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a quick CPU test)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        opts = json.loads(args.child)
        fn = child_reference if opts["variant"] == "reference_fp32" else child_engine
        print("RESULT " + json.dumps(fn(opts)), flush=True)
        return 0
    if not args.out:
        ap.error("--out DIR is required")
    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    size_name = "tiny" if args.tiny else "full"
    size = SIZES[size_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wanted = args.variants.split(",")
    from prism_ray.estimate import expected_extra_teachers, network_flops
    res, k = size["resolution"], size["classes"]
    flops = {n: network_flops(n, res, k, 3) for n in [PRIMARY, *POOL]}
    with torch.device("meta"):
        pool_bn = {n: has_batchnorm(build_model(n, ModelShape(k, 3, res))) for n in POOL}
    p_member = expected_extra_teachers(recover_cfg(1)) / len(POOL)
    per_run = {n: size["images"] * (f["forward"] + f["backward_input"]) for n, f in flops.items()}
    engine_flops = per_run[PRIMARY] + p_member * sum(per_run[n] for n in POOL if pool_bn[n])
    reference_flops = 2 * per_run[PRIMARY] + p_member * sum(
        per_run[n] if pool_bn[n] else size["images"] * flops[n]["forward"] for n in POOL)
    name = known_gpu()
    peak = bf16_peak(name)

    check_dir = Path(tempfile.mkdtemp(prefix="prism-gpu-check-"))
    results: dict = {}
    failed = []

    def remaining() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    def base_opts(variant: str, tasks: list[str], **extra) -> dict:
        return {"variant": variant, "size": size_name, "device": str(device), "tasks": tasks,
                "compile_backend": args.compile_backend, "check_file": str(check_dir / f"{variant}.pt"), **extra}

    for variant in wanted:
        if remaining() < 10:
            results[variant] = {"error": "skipped: time budget spent"}
            continue
        if variant == "bf16_cl_cudagraphs" and device.type != "cuda":
            results[variant] = {"error": "skipped: CUDA graphs need a GPU"}
            continue
        print(f"[gpu_recover] {variant} ({remaining():.0f} s of budget left)", file=sys.stderr, flush=True)
        if variant == "concurrent":
            best = min((v for v in results if v in ENGINE_VARIANTS and "members_ms" in results[v]),
                       key=lambda v: expected(results[v]["members_ms"], p_member, True, pool_bn), default=None)
            if best is None:
                results[variant] = {"error": "skipped: no engine variant finished"}
                continue
            runs = {}
            for procs in (1, 2):
                wait_dir = Path(tempfile.mkdtemp(prefix="prism-gpu-wait-"))
                children = [spawn(base_opts(best, ["concurrent"], wait_dir=str(wait_dir), tag=i))
                            for i in range(procs)]
                deadline = time.perf_counter() + max(remaining(), 1)
                while len(list(wait_dir.glob("ready-*"))) < procs and time.perf_counter() < deadline \
                        and all(c.poll() is None for c in children):
                    time.sleep(0.05)
                (wait_dir / "go").touch()
                outs = [collect(c, remaining()) for c in children]
                shutil.rmtree(wait_dir, ignore_errors=True)
                if any("error" in o for o in outs):
                    runs[procs] = {"error": next(o["error"] for o in outs if "error" in o)}
                    break
                wall = max(o["concurrent"]["end"] for o in outs) - min(o["concurrent"]["start"] for o in outs)
                images = sum(o["concurrent"]["images"] for o in outs)
                runs[procs] = {"images_per_s": images / wall, "wall_s": wall,
                               "peak_memory_gib_each": [o.get("peak_memory_gib") for o in outs]}
            results[variant] = {"variant_run": best, "runs": runs}
            if all("images_per_s" in runs.get(p, {}) for p in (1, 2)):
                results[variant]["speedup_two_per_gpu"] = runs[2]["images_per_s"] / runs[1]["images_per_s"]
            else:
                failed.append(variant)
            continue
        tasks = ["members", "pre", "sync"] + (["closeness"] if variant in ENGINE_VARIANTS else [])
        out = collect(spawn(base_opts(variant, tasks)), remaining())
        results[variant] = out
        if "error" in out:
            failed.append(variant)

    rows = []
    for variant, r in results.items():
        if "members_ms" not in r:
            continue
        engine = variant != "reference_fp32"
        step = expected(r["members_ms"], p_member, engine, pool_bn)
        executed = engine_flops if engine else reference_flops
        rebuild = sum(r.get("rebuild_s", [])) / max(len(r.get("rebuild_s", [])), 1) if not engine else 0.0
        row = {"variant": variant, "step_ms": step,
               "s_per_image": (step / 1000 * MEAN_ITERATIONS + rebuild) / size["images"],
               "tflops": executed / (step / 1000) / 1e12, "peak_memory_gib": r.get("peak_memory_gib"),
               "syncs_per_step": (r.get("syncs") or {}).get("per_step"), "warmup_s": r.get("warmup_s")}
        if peak:
            row["fraction_of_bf16_peak"] = row["tflops"] / peak
        rows.append(row)
        r["summary"] = row
    ref = next((r for r in rows if r["variant"] == "reference_fp32"), None)
    for r in rows:
        if ref:
            r["speedup_vs_reference"] = ref["s_per_image"] / r["s_per_image"]
    checks = {}
    if (check_dir / "fp32.pt").exists():
        norm = Normalization(*IMAGENET_STATS)
        for variant in ENGINE_VARIANTS:
            f = check_dir / f"{variant}.pt"
            if variant != "fp32" and f.exists():
                checks[variant] = closeness(str(check_dir / "fp32.pt"), str(f), norm)
    for f in check_dir.iterdir():
        f.unlink()
    check_dir.rmdir()

    production = next((r for r in rows if r["variant"] == "bf16_cl"), None)
    result = {"bench": "gpu_recover", "machine": machine(), "device": str(device), "gpu": name,
              "bf16_dense_peak_tflops": peak, "size": size_name, "setup": {**size, "primary": PRIMARY, "pool": POOL,
                                                                             "member_probability": p_member,
                                                                             "mean_iterations": MEAN_ITERATIONS},
              "flops_per_step": {"engine_expected": engine_flops, "reference_expected": reference_flops,
                                 "per_teacher_run": per_run},
              "variants": results, "summary": rows, "closeness": checks,
              "seconds": time.perf_counter() - t_start}
    if production and "fraction_of_bf16_peak" in production:
        result["efficiency"] = {"recover": production["fraction_of_bf16_peak"]}
        result["efficiency_variant"] = "bf16_cl (the engine's CUDA default: eager, bf16 autocast, channels_last)"
    write_json(out_dir / "gpu_recover.json", result)
    text = [f"# recover on {name or 'CPU'} ({size_name} sizes: {size['images']} images at {res} px)", "",
            table(rows, ["variant", "step_ms", "s_per_image", "speedup_vs_reference", "tflops",
                         "fraction_of_bf16_peak", "peak_memory_gib", "syncs_per_step", "warmup_s"])]
    if "concurrent" in results and "runs" in results["concurrent"]:
        c = results["concurrent"]
        text += ["", f"two shards per GPU ({c['variant_run']}): " + ", ".join(
            f"{p} process(es) {v.get('images_per_s', float('nan')):.2f} images/s" for p, v in c["runs"].items())
            + (f"; speedup {c['speedup_two_per_gpu']:.2f}x" if "speedup_two_per_gpu" in c else "")]
    if checks:
        text += ["", table([{"variant": v, "close": c["close"], "honest_ce": c["honest_loss_rel_diff"]["ce"],
                             "honest_bn": c["honest_loss_rel_diff"]["bn"], "as_good": c["as_good_ok"],
                             "mean_abs_levels": c["image_mean_abs_levels"],
                             "image_rel_deviation": c["image_rel_deviation"]} for v, c in checks.items()],
                           ["variant", "close", "honest_ce", "honest_bn", "as_good", "mean_abs_levels",
                            "image_rel_deviation"])]
    errors = {v: r["error"] for v, r in results.items() if isinstance(r, dict) and "error" in r}
    if errors:
        text += ["", *(f"- {v}: {e}" for v, e in errors.items())]
    (out_dir / "gpu_recover.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
