"""Student training recipe: losses, optimizer groups, schedule, exact resume, and learning from soft labels."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prism_ray.algo.soft_labels import dense_labels, plan_epoch, soft_labels
from prism_ray.algo.student import (backward_batch, build_optimizer, build_scheduler, build_student, distill_loss,
                                    lr_factor, scored_epoch, train_student)
from prism_ray.algo.teachers import ConvNet, ModelShape, build_model, freeze
from prism_ray.algo.train import evaluate_classifier
from prism_ray.config import EvaluateConfig
from prism_ray.config_loader import load_config



def cfg(**kw) -> EvaluateConfig:
    return EvaluateConfig(**kw)


# ------------------------------------------------------------------------------------------------- losses


def test_mse_ce_is_mse_on_logits_plus_weighted_hard_label_ce():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0, 1])
    mse = (1 + 0 + 1 + 1) / 4
    ce = (-math.log(math.e / (math.e + 1)) - math.log(math.e ** 2 / (1 + math.e ** 2))) / 2
    got = distill_loss(s, t, cfg(loss="mse_ce", ce_weight=0.1), targets=y)
    assert got.item() == pytest.approx(mse + 0.1 * ce, rel=1e-6)
    assert distill_loss(s, t, cfg(loss="mse_ce", ce_weight=0.0)).item() == pytest.approx(mse)
    with pytest.raises(ValueError, match="targets"):
        distill_loss(s, t, cfg(loss="mse_ce", ce_weight=0.1))


def test_kl_is_batch_mean_kl_at_temperature_without_t_squared():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    temp = 2.0

    def softmax(row):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    want = sum(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(softmax(tr), softmax(sr)))
               for sr, tr in zip(s.tolist(), t.tolist())) / 2
    assert distill_loss(s, t, cfg(loss="kl", temperature=temp)).item() == pytest.approx(want, rel=1e-5)


# -------------------------------------------------------------------------------------- optimizer, schedule


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)


@pytest.mark.parametrize("make", [Mixed, lambda: build_model("resnet18", ModelShape(10, 1, 28)),
                                  lambda: build_model("mobilenet_v2", ModelShape(10, 1, 28))])
def test_no_decay_group_holds_exactly_the_norm_and_bias_parameters(make):
    model = make()
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    want = {id(p) for m in model.modules() for n, p in m.named_parameters(recurse=False)
            if isinstance(m, norms) or n == "bias"}
    opt = build_optimizer(model, cfg(optimizer="adamw", weight_decay=0.01))
    decay, no_decay = opt.param_groups
    assert {id(p) for p in no_decay["params"]} == want and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 0.01
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # the SRe2L / PRISM reference rule (decay only weights of 2+ dims) picks the same split here
    assert {id(p) for p in decay["params"]} == {id(p) for n, p in model.named_parameters() if p.dim() > 1}
    plain = build_optimizer(model, cfg(optimizer="sgd", no_decay_norm_bias=False, weight_decay=5e-4))
    assert isinstance(plain, torch.optim.SGD) and len(plain.param_groups) == 1
    assert plain.param_groups[0]["momentum"] == 0.9 and plain.param_groups[0]["weight_decay"] == 5e-4


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_the_optimizer_updates_every_tensor_at_once_to_the_per_tensor_loop_s_bits(optimizer):
    model = build_student("shufflenet_v2_x0_5", ModelShape(10, 1, 28), 0)
    twin = copy.deepcopy(model)
    c = cfg(optimizer=optimizer, lr=0.01, weight_decay=0.01)
    ours = build_optimizer(model, c)
    assert all(g["foreach"] for g in ours.param_groups)
    loop = build_optimizer(twin, c)
    for g in loop.param_groups:
        g["foreach"] = False  # torch's per-tensor loop, its default on a CPU
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        loop.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name


def test_cosine_schedule_per_step_without_warmup():
    model = nn.Linear(2, 2)
    c = cfg(epochs=3, lr=0.1, schedule="cosine")
    opt = build_optimizer(model, c)
    sched = build_scheduler(opt, c, steps_per_epoch=4)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * k / 12)) for k in range(12)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_prism_reference_schedule_is_per_epoch_with_its_late_drop():
    f = [lr_factor(e * 10, 10, 12, "prism_reference") for e in range(12)]
    assert f[0] == 1.0 and f[1] == lr_factor(19, 10, 12, "prism_reference")  # constant within an epoch
    assert f[10] == pytest.approx(0.75)  # 0.5 (1 + cos(pi / 3)) at e = 5E/6
    assert f[11] == pytest.approx(0.75 / 12)
    assert all(a > b for a, b in zip(f, f[1:]))


def authors_prism_lambda(e: int, epochs: int) -> float:
    """The PRISM authors' LambdaLR factor (validate/train_FKD_parallel.py, `--cos`), stepped once per epoch."""
    if e <= epochs * 5 / 6:
        return 0.5 * (1.0 + math.cos(math.pi * e / (2.5 * epochs)))
    return 0.5 * (1.0 + math.cos(math.pi * 5 / (6 * 2.5))) * (6 * epochs - 6 * e) / (6 * epochs)


def authors_sre2l_lambda(e: int, epochs: int) -> float:
    """SRe2L's LambdaLR factor (SRe2L/validate/train_FKD.py, `--cos`), stepped once per epoch."""
    return 0.5 * (1.0 + math.cos(math.pi * e / epochs)) if e <= epochs else 0.0


@pytest.mark.parametrize("epoch", [0, 1, 249, 250, 251, 298, 299])
def test_prism_reference_factor_equals_the_authors_lambda_at_300_epochs(epoch):
    assert lr_factor(epoch * 200, 200, 300, "prism_reference") == pytest.approx(authors_prism_lambda(epoch, 300),
                                                                                rel=1e-12, abs=1e-15)


def test_the_reference_schedules_step_per_epoch_like_the_authors_lambdalr():
    """Our scheduler steps every optimizer step; the authors' LambdaLR steps once per epoch: the learning rate
    of every step of epoch e must be their lambda(e) (E = 12 epochs of 3 steps, the 5E/6 edge at epoch 10)."""
    for schedule, reference in (("prism_reference", authors_prism_lambda), ("cosine_epoch", authors_sre2l_lambda)):
        c = cfg(epochs=12, lr=0.1, schedule=schedule)
        ours = build_optimizer(nn.Linear(2, 2), c)
        sched = build_scheduler(ours, c, steps_per_epoch=3)
        theirs = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=0.1)
        per_epoch = torch.optim.lr_scheduler.LambdaLR(theirs, lambda e: reference(e, 12))
        for epoch in range(12):
            for _ in range(3):
                assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12), \
                    (schedule, epoch)
                ours.step()
                sched.step()
            theirs.step()
            per_epoch.step()
    assert authors_prism_lambda(250, 300) == pytest.approx(0.75) and authors_prism_lambda(251, 300) < 0.13


def test_scored_epochs_follow_the_references_rule():
    assert [e for e in range(300) if scored_epoch(e, 300, 10)] == [*range(0, 300, 10), 299]
    assert [e for e in range(7) if scored_epoch(e, 7, 3)] == [0, 3, 6]
    assert [e for e in range(5) if scored_epoch(e, 5, 0)] == [4]  # 0: after the last epoch only


# --------------------------------------------------------------------------------------- accumulation, bf16


def reference_accumulation(model, x, soft, y, steps: int, ce_weight: float) -> None:
    """The PRISM validate loop's gradient accumulation on one batch, one GPU: slices of batch / steps images,
    MSE + ce_weight * CE each, divided by steps, backward, summed in the parameters' gradients."""
    small = x.shape[0] // steps
    for i in range(steps):
        part = slice(i * small, (i + 1) * small)
        out = model(x[part]).float()
        loss = F.mse_loss(out, soft[part]) + F.cross_entropy(out, y[part]) * ce_weight
        (loss / steps).backward()


def test_two_micro_batches_of_25_give_the_reference_loops_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 16, 16, generator=g)
    soft, y = torch.randn(50, 10, generator=g), torch.randint(10, (50,), generator=g)
    ref_model = build_student("resnet18", ModelShape(10, 3, 16), seed=3).train()
    ours, whole = copy.deepcopy(ref_model), copy.deepcopy(ref_model)
    reference_accumulation(ref_model, x, soft, y, steps=2, ce_weight=0.1)
    c = cfg(batch_size=50, accumulation_steps=2, loss="mse_ce", ce_weight=0.1)
    total = backward_batch(ours, x, soft, c, targets=y)
    for (name, a), b in zip(ref_model.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    for (name, a), b in zip(ref_model.named_buffers(), ours.buffers()):  # BN running statistics: two updates
        torch.testing.assert_close(b, a, msg=name)
    assert total.item() > 0
    # the whole batch at once normalises over 50 images: other gradients (the accumulation is not a no-op)
    backward_batch(whole, x, soft, cfg(batch_size=50, accumulation_steps=1, loss="mse_ce", ce_weight=0.1), targets=y)
    conv = next(p for n, p in whole.named_parameters() if n == "conv1.weight")
    assert not torch.allclose(conv.grad, ours.conv1.weight.grad, rtol=1e-3, atol=1e-6)


def test_the_defaults_are_the_prism_recipe_s_and_fp32():
    assert (cfg().schedule, cfg().accumulation_steps, cfg().eval_every) == ("prism_reference", 2, 10)


def test_bf16_students_train_under_autocast_and_fp32_is_the_default():
    assert cfg().precision == "fp32"
    x, y = separable_set(4, seed=4, size=8)
    label_fn = label_fn_for(x, [ChannelTeacher()], seed=1, group=4, out_size=8)
    trained = {}
    for precision in ("fp32", "bf16"):
        model = build_student("convnet", ModelShape(3, 3, 8), seed=1)
        out = train_student(model, x, label_fn, cfg(epochs=2, batch_size=4, lr=0.01, precision=precision,
                                                    loss="mse_ce", ce_weight=0.1), out_size=8, targets=y)
        assert math.isfinite(out["final_loss"])
        trained[precision] = model.state_dict()
    first = next(iter(trained["fp32"]))
    assert trained["fp32"][first].dtype == trained["bf16"][first].dtype == torch.float32  # weights stay fp32
    assert not torch.equal(trained["fp32"][first], trained["bf16"][first])  # the forward ran in bf16


# ----------------------------------------------------------------------------------------------- training


def separable_set(n_per_class: int, seed: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes, three channels: class c raises channel c everywhere, so any crop or flip keeps it."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = 0.3 * torch.randn(len(y), 3, size, size, generator=g)
    x[torch.arange(len(y)), y] += 1.5
    return x, y


class ChannelTeacher(nn.Module):
    """Logits = 4 x the per-channel mean: a perfect teacher for `separable_set`."""

    def forward(self, x):
        return 4 * x.mean((2, 3))


def label_fn_for(images, teachers, *, seed, group, out_size, topk=0, scale=(0.25, 1.0)):
    def label_fn(epoch):
        plan = plan_epoch(len(images), epoch, seed, mix_group=group, source_size=tuple(images.shape[-2:]),
                          crop_scale=scale, cutmix=True)
        values, indices = soft_labels(images, plan, teachers, out_size=out_size, topk=topk)
        return plan, dense_labels(values, indices, 3)
    return label_fn


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = ConvNet(3, 3, width=6, depth=2)
        self.body.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("make,optimizer", [(DropoutNet, "adamw"), (lambda: ConvNet(3, 3, width=6, depth=2), "sgd")])
def test_resume_from_a_saved_state_equals_training_straight_through(make, optimizer):
    x, y = separable_set(4, seed=0, size=8)
    label_fn = label_fn_for(x, [ChannelTeacher()], seed=5, group=2, out_size=8)
    c = cfg(epochs=4, batch_size=4, lr=0.01, optimizer=optimizer, loss="mse_ce", ce_weight=0.1)
    saved = {}
    torch.manual_seed(1)
    straight = make()
    result = train_student(straight, x, label_fn, c, out_size=8, targets=y, seed=3,
                           on_epoch_end=lambda e, st: saved.__setitem__(e, copy.deepcopy(st)))
    assert result["epochs_run"] == 4 and sorted(saved) == [0, 1, 2, 3] and saved[1]["epoch"] == 2
    torch.manual_seed(2)  # another init: the state must overwrite it
    resumed = make()
    again = train_student(resumed, x, label_fn, c, out_size=8, targets=y, seed=3, state=saved[1])
    assert again["epochs_run"] == 2 and again["final_loss"] == result["final_loss"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # and the resumed run did train: the state after epoch 1 is not the final one
    first = next(iter(straight.state_dict()))
    assert not torch.equal(saved[1]["model"][first], straight.state_dict()[first])


def test_scores_every_n_epochs_survive_a_resume():
    x, y = separable_set(4, seed=0, size=8)
    label_fn = label_fn_for(x, [ChannelTeacher()], seed=5, group=2, out_size=8)
    c = cfg(epochs=5, batch_size=4, lr=0.01, loss="mse_ce", ce_weight=0.1, eval_every=2, accumulation_steps=2)
    val = separable_set(6, seed=7, size=8)

    def score(model):
        return evaluate_classifier(model, val, topk=(1, 2))

    saved = {}
    straight = build_student("convnet", ModelShape(3, 3, 8), seed=2)
    out = train_student(straight, x, label_fn, c, out_size=8, targets=y, score=score,
                        on_epoch_end=lambda e, st: saved.__setitem__(e, copy.deepcopy(st)))
    assert [s["epoch"] for s in out["scores"]] == [1, 3, 5]  # after epochs 0, 2 and 4 (the last)
    assert out["scores"][-1]["top1"] == score(straight)["top1"]
    assert [s["epoch"] for s in saved[1]["scores"]] == [1]
    resumed = build_student("convnet", ModelShape(3, 3, 8), seed=9)
    again = train_student(resumed, x, label_fn, c, out_size=8, targets=y, score=score, state=saved[1])
    assert again["scores"] == out["scores"]
    only_last = train_student(build_student("convnet", ModelShape(3, 3, 8), seed=2), x, label_fn,
                              cfg(**{**c.__dict__, "eval_every": 0}), out_size=8, targets=y, score=score)
    assert [s["epoch"] for s in only_last["scores"]] == [5]


def test_stored_and_live_labels_train_the_same_student_bitwise():
    x, y = separable_set(4, seed=1, size=8)
    torch.manual_seed(0)
    teachers = [freeze(ConvNet(3, 3, width=4, depth=2)), ChannelTeacher()]
    live = label_fn_for(x, teachers, seed=9, group=2, out_size=8, topk=2)
    stored = {}
    for e in range(3):  # the relabel stage: labels per range of groups, through numpy as Parquet would hand them back
        plan = plan_epoch(len(x), e, 9, mix_group=2, source_size=(8, 8), crop_scale=(0.25, 1.0), cutmix=True)
        parts = [soft_labels(x, plan, teachers, out_size=8, topk=2, start=s, stop=min(s + 4, len(x)))
                 for s in range(0, len(x), 4)]
        values = torch.from_numpy(torch.cat([v for v, _ in parts]).numpy().copy())
        indices = torch.from_numpy(torch.cat([i for _, i in parts]).numpy().copy())
        stored[e] = (plan, values, indices)
    c = cfg(epochs=3, batch_size=4, lr=0.01, loss="kl", temperature=4.0)
    a, b = build_student("convnet", ModelShape(3, 3, 8), seed=4), build_student("convnet", ModelShape(3, 3, 8), seed=4)
    train_student(a, x, live, c, out_size=8, targets=y)
    train_student(b, x, lambda e: (stored[e][0], dense_labels(stored[e][1], stored[e][2], 3)), c, out_size=8,
                  targets=y)
    for t1, t2 in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(t1, t2)


@pytest.mark.parametrize("loss", ["mse_ce", "kl"])
def test_student_learns_a_separable_set_from_a_teachers_soft_labels(loss):
    x, y = separable_set(10, seed=2)
    label_fn = label_fn_for(x, [ChannelTeacher()], seed=0, group=5, out_size=12)
    c = cfg(epochs=12, batch_size=10, lr=0.01, loss=loss, ce_weight=0.1, temperature=4.0)
    student = build_student("convnet", ModelShape(3, 3, 12), seed=0)
    result = train_student(student, x, label_fn, c, out_size=12, targets=y)
    assert math.isfinite(result["final_loss"]) and result["epochs_run"] == 12
    val_x, val_y = separable_set(30, seed=99)
    assert evaluate_classifier(student, (val_x, val_y), topk=(1,))["top1"] >= 0.9


@pytest.mark.parametrize("arch", ["convnet", "shufflenet_v2_x0_5"])
def test_an_nhwc_step_computes_the_nchw_step_s_loss_and_gradients(arch):
    """Students train channels_last on every device (faster on the CPU too): the same computation as NCHW, only
    the order of float sums differs. How far rounding alone moves the gradients is measured, not assumed:
    ShuffleNetV2's train-mode BN on 1x1 maps turns an input scaled by 1 + 1e-7 into ~1 % of its first
    convolution's gradient; NHWC must stay within that noise (a wrong layout would be off by O(1))."""
    x, y = separable_set(8, seed=3, size=16)
    plan, labels = label_fn_for(x, [ChannelTeacher()], seed=1, group=4, out_size=16)(0)
    c = cfg(batch_size=8, loss="mse_ce", ce_weight=0.1)
    batch, labels, y = x[plan.order[:8]], labels[:8], y[plan.order[:8]]
    nchw = build_student(arch, ModelShape(3, 3, 16), seed=5)
    rounded, nhwc = copy.deepcopy(nchw), copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    losses = [float(backward_batch(m, b, labels, c, targets=y)) for m, b in
              ((nchw, batch), (rounded, batch * (1 + 1e-7)), (nhwc, batch.contiguous(memory_format=torch.channels_last)))]
    assert losses[2] == pytest.approx(losses[0], rel=1e-4)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (nchw, rounded, nhwc)]
    noise = float((grads[1] - grads[0]).norm() / grads[0].norm())
    assert float((grads[2] - grads[0]).norm() / grads[0].norm()) <= max(10 * noise, 1e-5)


def test_an_nhwc_convnet_trains_to_the_nchw_weights():
    """Over whole epochs AdamW's first steps turn rounding into ±lr moves wherever a gradient is ~0, so training
    compounds float noise (ShuffleNetV2 at 16 px: final loss 9.13 NCHW, 8.41 NHWC after 6 epochs, as any two
    roundings would); the ConvNet student stays within 1e-4 and predicts the same. The demo's statistics on
    both layouts are in docs/benchmarks.md."""
    x, y = separable_set(8, seed=3, size=16)
    label_fn = label_fn_for(x, [ChannelTeacher()], seed=1, group=4, out_size=16)
    c = cfg(epochs=6, batch_size=8, lr=0.01, loss="mse_ce", ce_weight=0.1)
    nchw, nhwc = (build_student("convnet", ModelShape(3, 3, 16), seed=5) for _ in range(2))
    a = train_student(nchw, x, label_fn, c, out_size=16, targets=y, seed=2, channels_last=False)
    b = train_student(nhwc, x, label_fn, c, out_size=16, targets=y, seed=2, channels_last=True)
    assert next(p for p in nhwc.parameters() if p.dim() == 4 and p.shape[1] > 1).is_contiguous(
        memory_format=torch.channels_last)
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=1e-4)
    for (name, p), q in zip(nchw.state_dict().items(), nhwc.state_dict().values()):
        if p.is_floating_point():
            assert (p - q).norm() <= 1e-4 * p.norm() + 1e-6, name
    val = separable_set(20, seed=11, size=16)
    assert evaluate_classifier(nchw, val) == evaluate_classifier(nhwc, val)


# -------------------------------------------------------------------------------------------------- presets


def test_prism_recipe_is_the_reference():
    ev = load_config(overrides=["evaluate.recipe=prism"]).evaluate
    assert (ev.optimizer, ev.lr, ev.weight_decay, ev.no_decay_norm_bias) == ("adamw", 0.001, 0.01, True)
    assert (ev.loss, ev.ce_weight, ev.epochs, ev.batch_size) == ("mse_ce", 0.1, 300, 50)
    # validate/train_FKD_10_r18.sh: `--gradient-accumulation-steps 2 --cos`, autocast off, validation every 10
    assert (ev.accumulation_steps, ev.schedule, ev.precision, ev.eval_every) == (2, "prism_reference", "fp32", 10)
    assert ev.students == ["convnet"] and ev.seeds == [0, 1, 2]  # a recipe leaves students and seeds alone


def test_sre2l_recipe_is_the_reference():
    c = load_config(overrides=["evaluate.recipe=sre2l", "relabel.mix_group=1024", "evaluate.seeds=[4]"])
    ev = c.evaluate
    assert (ev.optimizer, ev.lr, ev.weight_decay, ev.no_decay_norm_bias) == ("adamw", 0.001, 0.01, True)
    assert (ev.loss, ev.temperature, ev.epochs, ev.batch_size) == ("kl", 20.0, 300, 1024)
    assert (ev.accumulation_steps, ev.schedule, ev.precision, ev.eval_every) == (2, "cosine_epoch", "fp32", 10)
    assert ev.seeds == [4]


def test_a_student_trains_the_same_from_a_resident_or_an_encoded_uint8_set():
    """The data path of ImageNet-size sets: uint8 pixels, augmented batch by batch on the device; the encoded
    holding (batches decoded in DataLoader workers) gives the same student, bit for bit."""
    from prism_ray.algo.encode import decode_pixels, encode_pixels
    from prism_ray.algo.image_source import EncodedImages, ResidentImages
    from prism_ray.data.base import Normalization

    x, y = separable_set(4, seed=3, size=8)
    pixels = (torch.sigmoid(x) * 255).round().to(torch.uint8)
    norm = Normalization((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    encoded = EncodedImages.from_blobs([encode_pixels(p, "png") for p in pixels], (3, 8, 8), norm, num_workers=2)
    assert torch.equal(decode_pixels(bytes(encoded.blob(5)), 3), pixels[5])  # PNG: lossless
    resident = ResidentImages(pixels, norm)
    c = cfg(epochs=2, batch_size=4, lr=0.01, loss="mse_ce", ce_weight=0.1)
    teachers = [ChannelTeacher()]
    students = []
    for images in (resident, encoded):
        def label_fn(epoch, images=images):
            plan = plan_epoch(len(images), epoch, 3, mix_group=2, source_size=(8, 8), crop_scale=(0.25, 1.0),
                              cutmix=True)
            return plan, dense_labels(*soft_labels(images, plan, teachers, out_size=8), 3)
        model = build_student("convnet", ModelShape(3, 3, 8), seed=1)
        out = train_student(model, images, label_fn, c, out_size=8, targets=y, seed=2)
        assert math.isfinite(out["final_loss"]) and out["epochs_run"] == 2
        students.append(model)
    for a, b in zip(students[0].state_dict().values(), students[1].state_dict().values()):
        assert torch.equal(a, b)
