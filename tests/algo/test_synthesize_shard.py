"""One shard end to end on tiny teachers: forward counts, teacher sets, averaging, determinism, records."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from prism_ray.algo.encode import decode_images
from prism_ray.algo.synthesize import ShardSpec, initial_images, synthesize_shard
from prism_ray.algo.teachers import ModelShape, build_model, freeze
from prism_ray.config import RecoverConfig

SHAPE = (1, 16, 16)


def recover_cfg(**overrides) -> RecoverConfig:
    # bn_only: the pinned pixels below were made with it; the reference divisor has its own test
    base = dict(primary="primary", bn_pool=["bn_a", "bn_b", "no_bn"], selection="pre", slots=3, slot_prob=0.5,
                init="noise", lr=0.1, iterations=6, schedule="flat", jitter=2, crop_scale=[0.5, 1.0],
                image_format="png", bn_average="bn_only")
    return RecoverConfig(**{**base, **overrides})


def spec(seed: int = 11, classes=(0, 3, 5, 7), ipc: int = 0) -> ShardSpec:
    return ShardSpec(f"ipc{ipc}-s{seed}", ipc, classes, seed)


@contextmanager
def forward_counts(pool):
    counts: Counter = Counter()
    handles = [m.register_forward_hook(lambda *_, n=name: counts.update([n])) for name, m in pool.items()]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def test_primary_runs_once_per_step_and_extras_as_often_as_recorded(pool, norm):
    # the primary also sits in the BN pool: it must still run once per step, not twice
    cfg = recover_cfg(selection="intra", bn_pool=["primary", "bn_a", "bn_b", "no_bn"], iterations=12)
    with forward_counts(pool) as counts:
        result = synthesize_shard(pool, spec(), cfg, norm, shape=SHAPE)
    assert counts["primary"] == result.iterations == 12
    usage = json.loads(result.records[0].bn_teacher_usage)
    assert usage == result.bn_teacher_usage
    assert usage["primary"] == 12
    for name in ("bn_a", "bn_b"):
        assert counts[name] == usage.get(name, 0)
    assert counts["no_bn"] == 0  # a teacher without BN layers has no BN loss to give: never run


def test_pre_uses_one_drawn_set_for_every_iteration(pool, norm):
    sets = set()
    for seed in range(8):
        cfg = recover_cfg(selection="pre", iterations=3)
        with forward_counts(pool) as counts:
            result = synthesize_shard(pool, spec(seed), cfg, norm, shape=SHAPE)
        record = result.records[0]
        assert record.bn_teachers[0] == "primary"
        assert set(record.bn_teachers) <= {"primary", "bn_a", "bn_b", "no_bn"}
        assert all(n == 3 for n in result.bn_teacher_usage.values())  # every used teacher, every iteration
        for name in ("bn_a", "bn_b"):
            assert counts[name] == (3 if name in record.bn_teachers else 0)
        sets.add(tuple(record.bn_teachers))
    assert len(sets) > 1


def test_intra_draws_a_new_set_each_iteration(pool, norm):
    cfg = recover_cfg(selection="intra", iterations=30)
    result = synthesize_shard(pool, spec(), cfg, norm, shape=SHAPE)
    usage = result.bn_teacher_usage
    assert usage["primary"] == 30
    extras = {n: k for n, k in usage.items() if n != "primary"}
    assert extras and all(0 < k < 30 for k in extras.values())
    # 3 slots at 0.5 from 3 candidates: 1.5 extras per iteration on average
    assert 0.8 * 45 <= sum(extras.values()) <= 1.2 * 45 + 10
    assert result.records[0].bn_teachers == ["primary", *[n for n in ("bn_a", "bn_b", "no_bn") if n in usage]]


def test_fixed_with_no_extras_is_single_teacher(pool, norm):
    cfg = recover_cfg(selection="fixed", fixed=[], iterations=4)
    with forward_counts(pool) as counts:
        result = synthesize_shard(pool, spec(), cfg, norm, shape=SHAPE)
    assert result.records[0].bn_teachers == ["primary"]
    assert counts == Counter({"primary": 4})


def test_averaging_modes_in_the_objective(pool, norm):
    # with the BN-free teacher drawn beside the primary, the reference divisor halves the first BN term
    runs = {mode: synthesize_shard(pool, spec(), recover_cfg(selection="fixed", fixed=["no_bn"], bn_average=mode),
                                   norm, shape=SHAPE)
            for mode in ("reference", "bn_only")}
    ref, only = runs["reference"].history["loss_bn"][0], runs["bn_only"].history["loss_bn"][0]
    assert only > 0
    assert ref == pytest.approx(only / 2, rel=1e-6)
    assert runs["reference"].records[0].bn_teachers == ["primary", "no_bn"]


def test_bn_normalize_starts_every_teacher_at_one(pool, norm):
    cfg = recover_cfg(selection="fixed", fixed=["bn_a", "bn_b"], bn_normalize=True)
    plain = synthesize_shard(pool, spec(), dataclasses.replace(cfg, bn_normalize=False), norm, shape=SHAPE)
    normalized = synthesize_shard(pool, spec(), cfg, norm, shape=SHAPE)
    assert plain.history["loss_bn"][0] != pytest.approx(1.0, rel=1e-2)
    assert normalized.history["loss_bn"][0] == pytest.approx(1.0, rel=1e-6)


def test_same_shard_same_bytes_other_seed_differs(pool, norm):
    cfg = recover_cfg(selection="intra", image_format="jpeg")
    a = synthesize_shard(pool, spec(5), cfg, norm, shape=SHAPE)
    b = synthesize_shard(pool, spec(5), cfg, norm, shape=SHAPE)
    c = synthesize_shard(pool, spec(6), cfg, norm, shape=SHAPE)
    assert a.encoded == b.encoded
    assert torch.equal(a.images, b.images)
    assert a.bn_teacher_usage == b.bn_teacher_usage and a.history == b.history
    assert a.encoded != c.encoded
    assert all(x != y for x, y in zip(a.encoded, c.encoded))


def test_noise_init_follows_the_shard_seed():
    cfg = recover_cfg(init="noise")
    a, again, b = (initial_images(spec(seed), cfg, None, SHAPE) for seed in (5, 5, 6))
    assert a.shape == (4, *SHAPE)
    assert torch.equal(a, again) and not torch.equal(a, b)
    assert abs(a.mean().item()) < 0.2 and abs(a.std().item() - 1) < 0.2  # N(0, 1) in normalized space


def test_views_follow_the_shard_seed(pool, norm):
    # fixed teachers and a real start: only the crops, flips and rolls can make two seeds differ
    init = norm.normalize(torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0)))
    cfg = recover_cfg(selection="fixed", fixed=["bn_a"], init="real")
    a, b = (synthesize_shard(pool, spec(seed), cfg, norm, init) for seed in (5, 6))
    assert not torch.equal(a.images, b.images)
    assert a.history["loss_ce"][0] != b.history["loss_ce"][0]


def test_real_init_starts_from_the_given_images(pool, norm):
    init = norm.normalize(torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0)))
    cfg = recover_cfg(init="real", lr=1e-6, iterations=1)
    result = synthesize_shard(pool, spec(), cfg, norm, init)
    assert torch.allclose(result.images, init, atol=1e-4)  # one tiny step away from the start
    with pytest.raises(ValueError, match="init_images"):
        synthesize_shard(pool, spec(), cfg, norm)
    with pytest.raises(ValueError, match=r"\(4, C, H, W\)"):
        synthesize_shard(pool, spec(), cfg, norm, init[:3])


def test_records_are_plain_parquet_rows(pool, norm):
    cfg = recover_cfg(iterations=5, schedule="cyclic", cyclic_step=2, cyclic_period=3)
    result = synthesize_shard(pool, spec(ipc=4), cfg, norm, shape=SHAPE)
    assert result.iterations == 3  # 5 - 2 * (4 % 3)
    assert result.extension == "png"
    assert len(result.records) == len(result.encoded) == result.images.shape[0] == 4
    assert result.images.dtype == torch.float32 and result.images.device.type == "cpu"
    low, high = norm.bounds(result.images)
    assert (result.images >= low - 1e-6).all() and (result.images <= high + 1e-6).all()
    types = {"class_id": int, "ipc_index": int, "seed": int, "primary_teacher": str, "bn_teachers": list,
             "bn_teacher_usage": str, "iterations": int, "loss_ce": float, "loss_bn": float, "seconds": float}
    for record, class_id in zip(result.records, (0, 3, 5, 7)):
        row = record.to_row()
        assert {k: type(v) for k, v in row.items()} == types
        assert row["class_id"] == class_id and row["ipc_index"] == 4 and row["seed"] == 11
        assert row["iterations"] == 3 and row["primary_teacher"] == "primary"
        assert all(isinstance(n, str) for n in row["bn_teachers"])
        assert row["loss_bn"] == pytest.approx(result.history["loss_bn"][-1])
        assert row["seconds"] == pytest.approx(result.seconds / 4)
    mean_ce = sum(r.loss_ce for r in result.records) / 4
    assert mean_ce == pytest.approx(result.history["loss_ce"][-1], rel=1e-5)
    assert result.history["iteration"] == [0, 1, 2]
    assert decode_images(result.encoded, norm).shape == (4, *SHAPE)


def test_missing_teacher_and_missing_shape(pool, norm):
    with pytest.raises(KeyError, match="resnet50"):
        synthesize_shard(pool, spec(), recover_cfg(selection="fixed", fixed=["resnet50"]), norm, shape=SHAPE)
    with pytest.raises(ValueError, match="shape"):
        synthesize_shard(pool, spec(), recover_cfg(), norm)


def test_imagenet_shaped_shard_on_cpu():
    """The ImageNet configuration (224 px, 1000 classes, resnet18 + mobilenet_v2 + shufflenet): same code."""
    from prism_ray.data.base import IMAGENET_STATS, Normalization

    torch.manual_seed(0)
    shape = ModelShape(1000, 3, 224)
    pool = {name: freeze(build_model(name, shape)) for name in ("resnet18", "mobilenet_v2", "shufflenet_v2_x0_5")}
    cfg = RecoverConfig(primary="resnet18", bn_pool=["mobilenet_v2", "shufflenet_v2_x0_5"], selection="pre",
                        slots=3, slot_prob=1.0, init="noise", iterations=2, schedule="flat")
    norm = Normalization(*IMAGENET_STATS)
    with forward_counts(pool) as counts:
        result = synthesize_shard(pool, ShardSpec("in1k", 0, (0, 500, 999), 1), cfg, norm, shape=(3, 224, 224))
    assert counts == Counter({"resnet18": 2, "mobilenet_v2": 2, "shufflenet_v2_x0_5": 2})
    assert result.images.shape == (3, 3, 224, 224) and result.extension == "jpg"
    assert decode_images(result.encoded, norm).shape == (3, 3, 224, 224)
    assert [r.class_id for r in result.records] == [0, 500, 999]
    assert set(result.records[0].bn_teachers) == set(pool)


# One shard's 8-bit pixels (what the JPEG/PNG encoder receives), pinned in pinned_shard_pixels.png: its 4 images of
# 16x16 side by side, lossless. Pixels rather than files: JPEG/PNG bytes also depend on the Pillow/zlib build.
# The engine's CPU output is bit-stable for a given torch version, so any change to the step's arithmetic shows
# up here; the pin is updated only by a change that says why its bytes differ (see docs/recover.md, "Speed").
# Machines may legitimately differ where float sums are reassociated by other CPU kernels: the test compares the
# pixels, never the machine's name. With torch 2.14.1 on x86 the bytes are identical whatever the vector unit
# (ATEN_CPU_CAPABILITY=avx512, avx2 and default, 1 or 2 threads, all give the pinned digest); elsewhere a pixel
# may move by one level: at most PIXEL_TOLERANCE of the pixels, by 1. A change to the shard itself (another
# seed, another objective) moves almost every pixel by far more, as the test checks.
PINNED_PIXELS = Path(__file__).with_name("pinned_shard_pixels.png")
PINNED_DIGEST = "2189f5e0c75a842236c28e3a8e5146df1f6455540587de4d5100771b82222f6a"  # sha256 of the pinned bytes
PIXEL_TOLERANCE = 0.02


def pinned_shard_pixels(pool, norm, seed: int = 21) -> torch.Tensor:
    from prism_ray.algo.encode import to_uint8

    cfg = recover_cfg(selection="intra", iterations=8, image_format="jpeg", bn_normalize=True)
    return to_uint8(synthesize_shard(pool, spec(seed), cfg, norm, shape=SHAPE).images, norm)


def read_pinned_pixels() -> torch.Tensor:
    import numpy as np
    from PIL import Image

    strip = torch.from_numpy(np.asarray(Image.open(PINNED_PIXELS), dtype=np.uint8).copy())  # (16, 4 * 16)
    return strip.reshape(16, 4, 16).permute(1, 0, 2).unsqueeze(1).contiguous()  # (4, 1, 16, 16)


def pixel_change(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """Largest difference in levels, and the fraction of pixels that differ at all."""
    d = (a.int() - b.int()).abs()
    return int(d.max()), float((d > 0).float().mean())


def test_shard_pixels_are_pinned(pool, norm):
    import hashlib

    pinned = read_pinned_pixels()
    assert hashlib.sha256(pinned.numpy().tobytes()).hexdigest() == PINNED_DIGEST  # the file is the pin
    pixels = pinned_shard_pixels(pool, norm)
    assert pixels.shape == pinned.shape
    digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
    worst, moved = pixel_change(pixels, pinned)
    if digest != PINNED_DIGEST:  # another CPU's kernels: a level here and there, never a different image
        assert worst <= 1 and moved <= PIXEL_TOLERANCE, (
            f"this machine gives {digest}: {moved:.1%} of the pixels differ from the pin, by up to {worst} levels")
    # the tolerance is no blind spot: the same shard under another seed is another image
    worst, moved = pixel_change(pinned_shard_pixels(pool, norm, seed=22), pinned)
    assert worst > 100 and moved > 0.5


def test_encoding_waits_for_the_first_read(pool, norm):
    from prism_ray.algo.encode import encode_images

    cfg = recover_cfg(iterations=2, image_format="png")
    result = synthesize_shard(pool, spec(), cfg, norm, shape=SHAPE)
    assert result._encoded is None  # not encoded inside the shard's compute
    files = result.encoded
    assert files == encode_images(result.images, norm, "png") and result.encoded is files
    with pytest.raises(ValueError, match="exactly one of encoded"):
        type(result)(result.spec, result.images, "png", result.records, 2, {}, 0.0)


def test_a_teacher_set_kept_across_shards_gives_the_same_images(pool, norm):
    from prism_ray.algo.synthesize import TeacherSet

    cfg = recover_cfg(selection="intra", iterations=4)
    plain = [synthesize_shard(pool, spec(s), cfg, norm, shape=SHAPE) for s in (3, 4)]
    teachers = TeacherSet(pool, "cpu", first_bn_multiplier=cfg.first_bn_multiplier)
    try:
        kept = [synthesize_shard(teachers, spec(s), cfg, norm, shape=SHAPE) for s in (3, 4)]
        with pytest.raises(ValueError, match=r"first_bn_multiplier=10.0 \(the config needs 2.0\)"):
            synthesize_shard(teachers, spec(), recover_cfg(first_bn_multiplier=2.0), norm, shape=SHAPE)
    finally:
        teachers.close()
    for a, b in zip(plain, kept):
        assert torch.equal(a.images, b.images) and a.history == b.history
    assert [h for m in pool.values() for layer in m.modules() for h in layer._forward_hooks.values()] == []


def test_compiled_teachers_give_the_same_images(pool, norm):
    # aot_eager: dynamo traces each teacher with its BN hooks and AOTAutograd splits forward and backward
    # without generating code, so CPU results stay bit-identical; Inductor is measured by bench/gpu_recover.py
    import torch._dynamo

    cfg = recover_cfg(selection="fixed", fixed=["bn_a", "bn_b"], iterations=3)
    eager = synthesize_shard(pool, spec(), cfg, norm, shape=SHAPE)
    torch._dynamo.reset()
    compiled = synthesize_shard(pool, spec(), cfg, norm, shape=SHAPE, compile={"backend": "aot_eager"})
    assert torch.equal(eager.images, compiled.images) and eager.history == compiled.history
    assert torch._dynamo.utils.counters["graph_break"] == {}  # hooks and their loss traced in one graph


def test_inference_form_with_amp_is_a_bf16_copy():
    from prism_ray.algo.bn_loss import BNStatisticHooks
    from prism_ray.algo.synthesize import inference_form
    from prism_ray.algo.teachers import ConvNet

    model = ConvNet(10, 1, width=4, depth=2)
    hooks = BNStatisticHooks(model)
    form = inference_form(model, amp=True)
    assert form is not model and not form.training
    convs = [m for m in form.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in form.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(c.weight.dtype == torch.bfloat16 for c in convs) and form.classifier.weight.dtype == torch.bfloat16
    assert all(b.weight.dtype == b.running_var.dtype == torch.float32 for b in bns)  # statistics stay fp32
    assert all(not m._forward_hooks for m in form.modules())  # the original's hooks are not copied
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    hooks.remove()
    assert inference_form(model) is model  # no amp, no channels_last: the model itself


def test_a_failing_shard_leaves_no_hooks_on_the_pool(pool, norm):
    # hooks left behind would keep recording (and holding activations) in every later forward pass
    with pytest.raises(ValueError, match="init_images"):
        synthesize_shard(pool, spec(), recover_cfg(init="real"), norm)
    with pytest.raises(ValueError, match="beta parameter"):  # Adam refuses it after the hooks exist
        synthesize_shard(pool, spec(), recover_cfg(betas=[2.0, 0.9]), norm, shape=SHAPE)
    assert [h for m in pool.values() for layer in m.modules() for h in layer._forward_hooks.values()] == []


def reference_bn_term(bn_teachers: list, x: torch.Tensor, first_multiplier: float = 10.0) -> float:
    """The BN term of the authors' data_synthesis.py (before r_bn): each teacher's sum over its BatchNorm2d
    layers of ||running_var - var||_2 + ||running_mean - mean||_2 of the layer's input (the first layer x10),
    summed over the drawn teachers, divided by count_aux, which counts every drawn teacher: a BN-free one adds
    nothing to the sum (the sum over its empty hook list is 0) and 1 to the count."""
    def r_feature(module, inputs, output):
        a = inputs[0]
        var = a.permute(1, 0, 2, 3).reshape(a.shape[1], -1).var(1, unbiased=False)
        terms.append(torch.norm(module.running_var - var, 2) + torch.norm(module.running_mean - a.mean([0, 2, 3]), 2))

    total, count_aux = 0.0, 0
    for model in bn_teachers:
        count_aux += 1
        terms = []
        hooks = [m.register_forward_hook(r_feature) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        total += sum(t.item() * (first_multiplier if i == 0 else 1.0) for i, t in enumerate(terms))
    return total / count_aux


def test_the_reference_divisor_with_a_bn_free_teacher_drawn_equals_the_authors_count_aux(pool, norm):
    """The prism preset's bn_average (reference): find shards whose draw holds the BN-free teacher (alexnet's
    role) and compare the first step's BN term with the authors' formula on the same view."""
    from prism_ray.algo.augment import apply_view, draw_view
    from prism_ray.algo.seeding import generator
    from prism_ray.config_loader import load_config

    assert load_config(overrides=["recover.preset=prism"]).recover.bn_average == "reference"
    cfg = recover_cfg(selection="pre", bn_average="reference", iterations=1, jitter=2, crop_scale=[0.5, 1.0])
    checked = 0
    for seed in range(40):
        sp = spec(seed)
        result = synthesize_shard(pool, sp, cfg, norm, shape=SHAPE)
        drawn = result.records[0].bn_teachers
        if "no_bn" not in drawn:
            continue
        x0 = initial_images(sp, cfg, None, SHAPE)
        view = draw_view(generator(sp.seed, "augment"), SHAPE[1], SHAPE[2], cfg.crop_scale, cfg.jitter)
        want = reference_bn_term([pool[n] for n in drawn], apply_view(x0, view))
        assert result.history["loss_bn"][0] == pytest.approx(want, rel=1e-5), drawn
        bn_only = synthesize_shard(pool, sp, dataclasses.replace(cfg, bn_average="bn_only"), norm, shape=SHAPE)
        assert bn_only.history["loss_bn"][0] == pytest.approx(want * len(drawn) / (len(drawn) - 1), rel=1e-5)
        checked += 1
    assert checked >= 3  # draws with the BN-free teacher and zero, one or two BN teachers beside the primary


def test_a_shared_teacher_seed_gives_shards_the_same_draw(pool, norm):
    cfg = recover_cfg(selection="pre", iterations=1)
    draws = {tuple(synthesize_shard(pool, ShardSpec(f"s{s}", 0, (0, 1), s, teacher_seed=77), cfg, norm,
                                    shape=SHAPE).records[0].bn_teachers) for s in range(6)}
    assert len(draws) == 1
    own = {tuple(synthesize_shard(pool, spec(s), cfg, norm, shape=SHAPE).records[0].bn_teachers) for s in range(6)}
    assert len(own) > 1


def test_bf16_precision_runs_anywhere_and_fp32_is_the_default(pool, norm):
    assert RecoverConfig().precision == "fp32"
    fp32 = synthesize_shard(pool, spec(3), recover_cfg(iterations=3), norm, shape=SHAPE)
    bf16 = synthesize_shard(pool, spec(3), recover_cfg(iterations=3, precision="bf16"), norm, shape=SHAPE)
    assert bf16.images.dtype == torch.float32 and torch.isfinite(bf16.images).all()
    assert not torch.equal(fp32.images, bf16.images)  # the teachers ran in bf16
