"""Recover engine against a loop that pays the PRISM reference's costs, side by side in one process.

Both get the same teachers (resnet18 primary; BN pool mobilenet_v2, efficientnet_b0, shufflenet_v2_x0_5,
alexnet; random weights), the same shards, views, teacher draws and iterations. Reported:
  - the cost of each pool member per step in each loop (the primary alone, then with one member);
  - the expected step under the reference's draw (3 slots at 0.5: each member in 37.5% of shards), and
    the ratio reference / engine, per step and per shard at the reference's mean iteration count (2,250)
    with the reference's per-IPC teacher rebuild;
  - sampled `pre` shards run by both loops (the ratio on the same draws), and `intra` selection;
  - JPEG encoding per image (the engine does it in the commit, off the compute path).

Usage: python bench/recover_engine.py [--images 10] [--resolution 224] [--iterations 3] [--shards 4]
                                      [--out bench/results/recover_engine.json]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _common import default_out, machine, table, write_json

import torch  # noqa: E402

from prism_ray.algo.schedule import iterations_for  # noqa: E402
from prism_ray.algo.seeding import derive_seed, generator  # noqa: E402
from prism_ray.algo.selection import TeacherSelection  # noqa: E402
from prism_ray.algo.synthesize import ShardSpec, TeacherSet, synthesize_shard  # noqa: E402
from prism_ray.algo.teachers import ModelShape, build_model, freeze, has_batchnorm  # noqa: E402
from prism_ray.config import RecoverConfig  # noqa: E402
from prism_ray.data.base import IMAGENET_STATS, Normalization  # noqa: E402
from prism_ray.estimate import expected_extra_teachers  # noqa: E402
from reference_loop import reference_shard, save_weights  # noqa: E402

PRIMARY = "resnet18"
POOL = ["mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet"]
REFERENCE_MEAN_ITERATIONS = sum(iterations_for(k, 4000, "cyclic", 500, 8) for k in range(8)) / 8  # 2,250


def recover_cfg(iterations: int, **kw) -> RecoverConfig:
    base = dict(primary=PRIMARY, bn_pool=list(POOL), selection="pre", slots=3, slot_prob=0.5, init="noise",
                iterations=iterations, schedule="flat", bn_average="reference", image_format="jpeg")
    return RecoverConfig(**{**base, **kw})


def engine_step_ms(teachers, spec, cfg, norm, shape) -> tuple[float, object]:
    result = synthesize_shard(teachers, spec, cfg, norm, shape=(shape.in_channels, shape.resolution, shape.resolution))
    return 1000 * result.seconds / result.iterations, result


def reference_step_ms(weights, extras, spec, cfg, shape) -> tuple[float, dict]:
    out = reference_shard(weights, PRIMARY, extras, spec, cfg, IMAGENET_STATS[0], IMAGENET_STATS[1], shape)
    return 1000 * out["seconds"]["steps"] / out["iterations"], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10, help="images per shard (classes per batch)")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--iterations", type=int, default=3, help="steps per timed shard")
    ap.add_argument("--shards", type=int, default=4, help="sampled pre shards run by both loops")
    ap.add_argument("--out", default=str(default_out("recover_engine")))
    args = ap.parse_args()

    shape = ModelShape(1000, 3, args.resolution)
    norm = Normalization(*IMAGENET_STATS)
    names = [PRIMARY, *POOL]
    pool = {n: freeze(build_model(n, shape, seed=derive_seed(0, "bench-teacher", n))) for n in names}
    classes = tuple(range(args.images))
    spec = lambda k: ShardSpec(f"ipc{k:04d}", k, classes, derive_seed(0, "bench", k))  # noqa: E731
    its = args.iterations
    tmp = tempfile.TemporaryDirectory()
    weights = save_weights(pool, tmp.name)
    teachers = TeacherSet(pool, "cpu")  # what a worker holds: loaded once, kept for every shard

    # warm-up: the first convolution of each shape sets up its kernels
    engine_step_ms(teachers, spec(99), recover_cfg(1, selection="fixed", fixed=POOL), norm, shape)
    reference_step_ms(weights, POOL, spec(99), recover_cfg(1), shape)

    # the cost of each pool member per step
    members = []
    e0, _ = engine_step_ms(teachers, spec(0), recover_cfg(its, selection="fixed", fixed=[]), norm, shape)
    r0, r0_out = reference_step_ms(weights, [], spec(0), recover_cfg(its), shape)
    members.append({"teacher": f"{PRIMARY} (primary)", "engine_ms": e0, "reference_ms": r0,
                    "note": "reference runs it twice"})
    for name in POOL:
        e, _ = engine_step_ms(teachers, spec(0), recover_cfg(its, selection="fixed", fixed=[name]), norm, shape)
        r, _ = reference_step_ms(weights, [name], spec(0), recover_cfg(its), shape)
        members.append({"teacher": name, "engine_ms": e - e0, "reference_ms": r - r0,
                        "note": "" if has_batchnorm(pool[name]) else "no BN: engine never runs it"})
    cfg = recover_cfg(its)
    p_member = expected_extra_teachers(cfg) / len(POOL)  # slots draw uniformly: members are exchangeable
    engine_expected = e0 + p_member * sum(m["engine_ms"] for m in members[1:])
    reference_expected = r0 + p_member * sum(m["reference_ms"] for m in members[1:])
    load_s = r0_out["seconds"]["load"]  # rebuild of the primary twice + verifier (+ drawn teachers below)
    rebuild_s = load_s + p_member * sum(_rebuild_seconds(weights, n, shape) for n in POOL)

    # sampled pre shards: the same draws for both loops
    shards = []
    for k in range(args.shards):
        s = spec(k)
        extras = TeacherSelection(PRIMARY, "pre", pool=POOL, slots=cfg.slots, prob=cfg.slot_prob,
                                  generator=generator(s.seed, "teachers")).candidates()[1:]
        e, res = engine_step_ms(teachers, s, cfg, norm, shape)
        r, out = reference_step_ms(weights, extras, s, cfg, shape)
        shards.append({"shard": s.shard_id, "drawn": ", ".join(extras) or "(none)", "engine_ms_per_step": e,
                       "reference_ms_per_step": r, "ratio": r / e, "reference_rebuild_s": out["seconds"]["load"],
                       "engine_shard_s": res.seconds, "reference_shard_s": out["seconds"]["total"]})
    # intra: a new draw every step
    intra = []
    for k in range(args.shards):
        e, res = engine_step_ms(teachers, spec(k), recover_cfg(its, selection="intra"), norm, shape)
        extra_runs = sum(v for n, v in res.bn_teacher_usage.items() if n != PRIMARY and has_batchnorm(pool[n]))
        intra.append({"ms": e, "extras_per_step": extra_runs / res.iterations})
    t0 = time.perf_counter()
    encoded = res.encoded
    encode_ms = 1000 * (time.perf_counter() - t0) / len(encoded)
    teachers.close()
    tmp.cleanup()

    n_img = args.images
    mean_its = REFERENCE_MEAN_ITERATIONS
    engine_s_img = engine_expected / 1000 * mean_its / n_img
    reference_s_img = (reference_expected / 1000 * mean_its + rebuild_s) / n_img
    pre_extras = [len([n for n in sh["drawn"].split(", ") if n in pool and has_batchnorm(pool[n])]) for sh in shards]
    result = {
        "bench": "recover_engine", "machine": machine(),
        "setup": {"images_per_shard": n_img, "resolution": args.resolution, "iterations_per_timed_shard": its,
                  "primary": PRIMARY, "pool": POOL, "slots": cfg.slots, "slot_prob": cfg.slot_prob,
                  "member_probability": p_member, "weights": "random"},
        "members": members,
        "expected_step_ms": {"engine": engine_expected, "reference": reference_expected,
                             "ratio": reference_expected / engine_expected},
        "at_reference_mean_iterations": {
            "iterations": mean_its, "engine_s_per_image": engine_s_img, "reference_s_per_image": reference_s_img,
            "reference_rebuild_s_per_shard": rebuild_s, "ratio": reference_s_img / engine_s_img},
        "sampled_pre_shards": shards,
        "sampled_ratio_per_step": statistics.mean(s["reference_ms_per_step"] for s in shards)
        / statistics.mean(s["engine_ms_per_step"] for s in shards),
        "selection": {"pre": {"ms_per_step": statistics.mean(s["engine_ms_per_step"] for s in shards),
                              "bn_extras_per_step": statistics.mean(pre_extras)},
                      "intra": {"ms_per_step": statistics.mean(i["ms"] for i in intra),
                                "bn_extras_per_step": statistics.mean(i["extras_per_step"] for i in intra)},
                      "expected_bn_extras_per_step": p_member * sum(has_batchnorm(pool[n]) for n in POOL)},
        "encode_ms_per_image": encode_ms,
    }
    path = write_json(args.out, result)
    print(f"recover engine vs reference-style loop: {n_img} images at {args.resolution} px, {its} steps per "
          f"timed shard, {result['machine']['cpu']}, {result['machine']['threads']} threads\n")
    print(table(members, ["teacher", "engine_ms", "reference_ms", "note"]))
    print()
    print(table([{"": "expected step (ms)", "engine": engine_expected, "reference": reference_expected,
                  "ratio": reference_expected / engine_expected},
                 {"": f"s/image at {mean_its:,.0f} iterations (+ rebuild)", "engine": engine_s_img,
                  "reference": reference_s_img, "ratio": reference_s_img / engine_s_img}],
                ["", "engine", "reference", "ratio"]))
    print()
    print(table(shards, ["shard", "drawn", "engine_ms_per_step", "reference_ms_per_step", "ratio",
                         "reference_rebuild_s"]))
    print()
    sel = result["selection"]
    print(table([{"selection": k, "ms_per_step": v["ms_per_step"], "bn_extras_per_step": v["bn_extras_per_step"]}
                 for k, v in sel.items() if isinstance(v, dict)], ["selection", "ms_per_step", "bn_extras_per_step"]))
    print(f"\nexpected BN extras per step (both modes): {sel['expected_bn_extras_per_step']:.3f}; "
          f"JPEG encoding {encode_ms:.2f} ms/image (in the commit, off the compute path)\nwrote {path}")


def _rebuild_seconds(weights: dict[str, str], name: str, shape: ModelShape) -> float:
    from reference_loop import load_like_reference
    t0 = time.perf_counter()
    load_like_reference(name, weights[name], shape, torch.device("cpu"))
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
