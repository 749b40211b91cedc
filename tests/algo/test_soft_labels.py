"""FKD-style epoch plans and soft labels: determinism, crop/flip/CutMix semantics, group-wise teacher runs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prism_ray.algo.encode import decode_pixels, encode_pixels
from prism_ray.algo.image_source import EncodedImages, ResidentImages
from prism_ray.algo.soft_labels import (EpochPlan, _crop_resize, augment_positions, crop_resize_batch, dense_labels,
                                        ensemble_logits, plan_epoch, soft_labels)
from prism_ray.algo.teachers import ConvNet, freeze
from prism_ray.data.base import Normalization

FIELDS = ("order", "crops", "flips", "partner", "mix_box", "mix_lam")


def plan(n=23, epoch=0, seed=0, group=5, size=16, scale=(0.25, 1.0), cutmix=True) -> EpochPlan:
    return plan_epoch(n, epoch, seed, mix_group=group, source_size=(size, size), crop_scale=scale, cutmix=cutmix)


@pytest.fixture(scope="module")
def teachers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [freeze(ConvNet(7, 3, width=6, depth=2)), freeze(ConvNet(7, 3, width=4, depth=2))]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(23, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def test_plan_is_a_pure_function_of_seed_and_epoch():
    a, b = plan(epoch=2, seed=7), plan(epoch=2, seed=7)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for other in (plan(epoch=3, seed=7), plan(epoch=2, seed=8)):
        assert not torch.equal(a.order, other.order)
        assert not torch.equal(a.crops, other.crops)
    assert sorted(a.order.tolist()) == list(range(23))
    assert (a.order.dtype, a.crops.dtype, a.flips.dtype, a.partner.dtype, a.mix_box.dtype, a.mix_lam.dtype) == (
        torch.int64, torch.int32, torch.bool, torch.int64, torch.int32, torch.float32)


def test_crops_respect_the_scale_range_and_the_image():
    wide = plan(n=600, group=600, size=64, scale=(0.25, 1.0), cutmix=False)
    narrow = plan(n=600, group=600, size=64, scale=(0.9, 1.0), cutmix=False)
    for p, low in ((wide, 0.25), (narrow, 0.9)):
        top, left, h, w = p.crops.T.tolist()
        fractions = [hh * ww / 64 ** 2 for hh, ww in zip(h, w)]
        assert min(fractions) >= low - 0.02 and max(fractions) <= 1.0
        assert all(0 <= t and t + hh <= 64 and 0 <= le and le + ww <= 64 for t, le, hh, ww in zip(top, left, h, w))
    assert min(h * w for h, w in wide.crops[:, 2:].tolist()) / 64 ** 2 < 0.3  # the low end is drawn
    assert 0.4 < wide.flips.float().mean() < 0.6


def test_cutmix_pairs_stay_in_groups_and_lambda_is_the_kept_area():
    seen_mix = 0
    for epoch in range(5):
        p = plan(epoch=epoch)
        for s in range(0, 23, 5):
            e = min(s + 5, 23)
            partner = p.partner[s:e]
            assert sorted(partner.tolist()) == list(range(s, e))  # a permutation inside the group
            mixed = partner != torch.arange(s, e)
            if mixed.any():
                boxes = p.mix_box[s:e][mixed]
                assert (boxes == boxes[0]).all()  # one box per group
                top, left, bottom, right = boxes[0].tolist()
                assert 0 <= top <= bottom <= 16 and 0 <= left <= right <= 16
                expected = 1 - (bottom - top) * (right - left) / 16 ** 2
                assert torch.allclose(p.mix_lam[s:e][mixed], torch.tensor(expected))
                seen_mix += int(mixed.sum())
            assert (p.mix_box[s:e][~mixed] == 0).all() and (p.mix_lam[s:e][~mixed] == 1).all()
    assert seen_mix > 20
    off = plan(cutmix=False)
    assert torch.equal(off.partner, torch.arange(23)) and (off.mix_lam == 1).all() and (off.mix_box == 0).all()


def hand_plan(**overrides) -> EpochPlan:
    fields = dict(epoch=0, order=torch.tensor([1, 0]),
                  crops=torch.tensor([[2, 1, 4, 4], [4, 4, 4, 4]], dtype=torch.int32),
                  flips=torch.tensor([True, False]), partner=torch.tensor([0, 1]),
                  mix_box=torch.zeros(2, 4, dtype=torch.int32), mix_lam=torch.ones(2), mix_group=2)
    fields.update(overrides)
    return EpochPlan(**fields)


def test_augment_positions_crops_flips_and_pastes_as_planned():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    own0 = x[1, :, 2:6, 1:5].flip(-1)  # position 0: image 1, box (2, 1, 4, 4), flipped
    own1 = x[0, :, 4:8, 4:8]           # position 1: image 0, box (4, 4, 4, 4)
    out = augment_positions(x, hand_plan(), 0, 2, out_size=4)
    assert torch.equal(out, torch.stack([own0, own1]))

    box = torch.tensor([[0, 1, 2, 4]] * 2, dtype=torch.int32)  # rows 0-1, columns 1-3
    mixed = augment_positions(x, hand_plan(partner=torch.tensor([1, 0]), mix_box=box, mix_lam=torch.full((2,), 0.625)),
                              0, 2, out_size=4)
    want0, want1 = own0.clone(), own1.clone()
    want0[:, 0:2, 1:4] = own1[:, 0:2, 1:4]
    want1[:, 0:2, 1:4] = own0[:, 0:2, 1:4]  # pasted from the un-mixed partner
    assert torch.equal(mixed, torch.stack([want0, want1]))


def test_augment_positions_resizes_the_crop_bilinearly():
    x = torch.tensor([[0.0, 4.0], [0.0, 4.0]]).reshape(1, 1, 2, 2)
    p = hand_plan(order=torch.tensor([0]), crops=torch.tensor([[0, 0, 2, 2]], dtype=torch.int32),
                  flips=torch.tensor([False]), partner=torch.tensor([0]), mix_box=torch.zeros(1, 4, dtype=torch.int32),
                  mix_lam=torch.ones(1), mix_group=1)
    out = augment_positions(x, p, 0, 1, out_size=4)
    assert torch.allclose(out[0, 0], torch.tensor([0.0, 1.0, 3.0, 4.0]).expand(4, 4))


def test_augment_positions_does_not_depend_on_the_span(images):
    p12 = plan_epoch(23, 0, 0, mix_group=5, source_size=(16, 16), crop_scale=(0.25, 1), cutmix=True, out_size=12)
    whole = augment_positions(images, p12, 0, 23, 12)
    parts = torch.cat([augment_positions(images, p12, s, min(s + 10, 23), 12) for s in range(0, 23, 10)])
    assert whole.shape == (23, 3, 12, 12) and torch.equal(whole, parts)
    # a list of (C, H, W) images (a lazy source) gives the same batch as the stacked tensor
    assert torch.equal(augment_positions(list(images), p12, 5, 15, 12), whole[5:15])
    with pytest.raises(ValueError, match="whole mix groups"):
        augment_positions(images, p12, 3, 10, 12)
    with pytest.raises(ValueError, match="12 px"):
        augment_positions(images, p12, 0, 5, 16)


def test_soft_labels_are_bitwise_the_same_whatever_the_call_pattern(images, teachers):
    p = plan()
    full, none = soft_labels(images, p, teachers, out_size=16)
    assert none is None and full.dtype == torch.float16 and full.shape == (23, 7)
    by_group = torch.cat([soft_labels(images, p, teachers, out_size=16, start=s, stop=e)[0] for s, e in p.groups()])
    by_pairs = torch.cat([soft_labels(images, p, teachers, out_size=16, start=s, stop=min(s + 10, 23))[0]
                          for s in range(0, 23, 10)])
    by_hand = torch.cat([ensemble_logits(teachers, augment_positions(images, p, s, e, 16)).half()
                         for s, e in p.groups()])
    for other in (by_group, by_pairs, by_hand):
        assert torch.equal(full, other)
    # the group is the ensemble's unit: rescaling over the whole epoch at once gives other labels
    assert not torch.equal(full, ensemble_logits(teachers, augment_positions(images, p, 0, 23, 16)).half())


def test_topk_is_the_top_of_the_full_logits(images, teachers):
    p = plan(epoch=1)
    full, _ = soft_labels(images, p, teachers, out_size=16)
    values, indices = soft_labels(images, p, teachers, out_size=16, topk=3)
    assert values.dtype == torch.float16 and indices.dtype == torch.int32 and values.shape == (23, 3)
    want = full.float().topk(3, dim=1)
    assert torch.equal(values.float(), want.values) and torch.equal(indices.long(), want.indices)
    dense = dense_labels(values, indices, 7)
    assert dense.dtype == torch.float32
    assert torch.equal(dense.gather(1, indices.long()), values.float())
    rest = torch.ones_like(dense, dtype=torch.bool).scatter_(1, indices.long(), False)
    assert torch.equal(dense[rest].reshape(23, 4), values.float()[:, 2:3].expand(23, 4))  # the row's smallest kept
    assert torch.equal(dense.argmax(1), full.float().argmax(1))
    assert (dense_labels(values, indices, 7, fill=-50.0)[rest] == -50).all()
    assert torch.equal(dense_labels(full, None, 7), full.float())
    with pytest.raises(ValueError, match="topk 8 exceeds"):
        soft_labels(images, p, teachers, out_size=16, topk=8)


class Fixed(nn.Module):
    """A 'teacher' whose logits are a given matrix whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))

    def forward(self, x):
        return self.logits


def test_ensemble_rescales_each_teacher_to_the_mean_norm():
    a, b = [[1.0, 2.0], [3.0, 4.0]], [[0.0, 10.0], [0.0, 0.0]]
    na, nb = math.sqrt(30), 10.0
    mean = (na + nb) / 2
    want = [[(a[i][j] * mean / na + b[i][j] * mean / nb) / 2 for j in range(2)] for i in range(2)]
    got = ensemble_logits([Fixed(a), Fixed(b)], torch.zeros(2, 1))
    assert got.dtype == torch.float32 and torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert torch.equal(ensemble_logits([Fixed(a)], torch.zeros(2, 1)), torch.tensor(a))


def test_primary_weighted_ensemble_mixes_then_rescales_rows_to_their_mean_norm():
    a, b, c = [[3.0, 4.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]], [[-1.0, 2.0], [2.0, 1.0]]
    mixed = [[0.5 * a[i][j] + 0.25 * (b[i][j] + c[i][j]) for j in range(2)] for i in range(2)]
    norms = [math.hypot(*row) for row in mixed]
    want = [[v / norms[i] * sum(norms) / 2 for v in mixed[i]] for i in range(2)]
    got = ensemble_logits([Fixed(a), Fixed(b), Fixed(c)], torch.zeros(2, 1), method="primary_weighted")
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    one = ensemble_logits([Fixed(a)], torch.zeros(2, 1), method="primary_weighted")
    assert torch.allclose(one, torch.tensor([[3.0, 4.0], [0.0, 1.0]]) * torch.tensor([[3.0 / 5], [3.0 / 1]]))
    with pytest.raises(ValueError, match="ensemble must be"):
        ensemble_logits([Fixed(a)], torch.zeros(2, 1), method="vote")


# ------------------------------------------------------------------ uint8 sets, batched augmentation, holdings


def uint8_images(n=30, size=32, channels=3, seed=4) -> torch.Tensor:
    """Smooth random pictures (blurred noise, like photos) as uint8 pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


NORM = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_batched_crop_resize_matches_the_per_image_antialiased_resize():
    """Crop boxes are never larger than the source, so for out_size >= the source's side the resize is an
    upsample, where antialiasing does nothing: one grid_sample with per-image grids equals torchvision-style
    per-image resizing up to the rounding of the sample coordinates. Bound: 0.01 of a pixel level (0..255);
    measured 0.004."""
    for size, outs in ((64, (64, 96)), (224, (224,))):
        x = uint8_images(n=100, size=size)
        p = plan_epoch(100, 0, 1, mix_group=100, source_size=(size, size), crop_scale=(0.08, 1.0), cutmix=False)
        for out in outs:
            batched = crop_resize_batch(x[p.order], p.crops, p.flips, out)
            single = torch.cat([_crop_resize(x[i], box, flip, out)
                                for i, box, flip in zip(p.order.tolist(), p.crops.tolist(), p.flips.tolist())])
            assert batched.shape == single.shape == (100, 3, out, out)
            assert (batched - single).abs().max() <= 0.01


def test_uint8_augmentation_is_close_to_the_float_path_and_bitwise_stable():
    """From uint8 the batch is resized then normalized; the float path normalized first, then resized. The
    two agree to float rounding (bound 1e-4 in normalized units, values within about +-2.6; measured 7e-7)."""
    x = uint8_images(n=24, size=32)
    floats = NORM.normalize(x.float().div(255.0))
    p = plan_epoch(24, 3, 2, mix_group=6, source_size=(32, 32), crop_scale=(0.25, 1.0), cutmix=True)
    resident = ResidentImages(x, NORM)
    from_uint8 = augment_positions(resident, p, 0, 24, 32)
    legacy = torch.cat([_crop_resize(floats[i], box, flip, 32)
                        for i, box, flip in zip(p.order.tolist(), p.crops.tolist(), p.flips.tolist())])
    source = legacy.clone()
    for i in range(24):  # CutMix as the per-image code pasted it
        j = int(p.partner[i])
        if j != i:
            t, l, b, r = p.mix_box[i].tolist()
            legacy[i, :, t:b, l:r] = source[j, :, t:b, l:r]
    assert (from_uint8 - legacy).abs().max() <= 1e-4
    # a position's batch is the same whatever span the call covers (whole groups)
    parts = torch.cat([augment_positions(resident, p, s, min(s + 12, 24), 32) for s in range(0, 24, 12)])
    assert torch.equal(parts, from_uint8)
    with pytest.raises(ValueError, match="normalization"):
        augment_positions(x, p, 0, 6, 32)


def encoded_set(x: torch.Tensor, workers: int) -> EncodedImages:
    blobs = [encode_pixels(img, "jpeg", 90) for img in x]
    return EncodedImages.from_blobs(blobs, tuple(x.shape[1:]), NORM, num_workers=workers)


def test_encoded_and_resident_sets_give_bitwise_equal_batches_and_labels(teachers):
    x = uint8_images(n=20, size=16)
    encoded = encoded_set(x, workers=2)
    decoded = torch.stack([decode_pixels(bytes(encoded.blob(i)), 3) for i in range(20)])
    resident = ResidentImages(decoded, NORM)
    assert encoded.nbytes < resident.nbytes
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    ranges = [(0, 7), (7, 14), (14, 20)]
    for a, b in zip(encoded.batches(order, ranges, "cpu"), resident.batches(order, ranges, "cpu")):
        assert a.dtype == torch.uint8 and torch.equal(a, b)
    p = plan_epoch(20, 1, 5, mix_group=5, source_size=(16, 16), crop_scale=(0.25, 1.0), cutmix=True)
    v_enc, _ = soft_labels(encoded, p, teachers, out_size=16)
    v_res, _ = soft_labels(resident, p, teachers, out_size=16)
    by_group = torch.cat([soft_labels(resident, p, teachers, out_size=16, start=s, stop=e)[0] for s, e in p.groups()])
    assert torch.equal(v_enc, v_res) and torch.equal(v_res, by_group)
    in_process = EncodedImages(encoded.buffer, encoded.offsets, (3, 16, 16), NORM, num_workers=0)
    assert torch.equal(soft_labels(in_process, p, teachers, out_size=16)[0], v_res)
