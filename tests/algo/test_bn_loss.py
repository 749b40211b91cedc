"""The BN statistic loss against hand computations, and how teachers' BN losses are averaged."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prism_ray.algo.bn_loss import BNStatisticHooks, average_bn_loss, bn_layers, bn_statistic_loss, teacher_bn_loss


def hand_r(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> float:
    """R = ||mean - rm|| + ||biased var - rv|| written out in float64 with plain loops over channels."""
    x = x.double()
    c = x.shape[1]
    sq_mean, sq_var = 0.0, 0.0
    for ch in range(c):
        values = x[:, ch].reshape(-1).tolist()
        mu = sum(values) / len(values)
        var = sum((v - mu) ** 2 for v in values) / len(values)  # biased: divide by n, not n - 1
        sq_mean += (mu - float(running_mean[ch])) ** 2
        sq_var += (var - float(running_var[ch])) ** 2
    return math.sqrt(sq_mean) + math.sqrt(sq_var)


def test_statistic_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
    rm, rv = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 3.0, 0.25])
    assert bn_statistic_loss(x, rm, rv).item() == pytest.approx(hand_r(x, rm, rv), rel=1e-5)


def test_statistic_loss_is_zero_when_batch_matches_running_stats():
    x = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])  # one channel: mean 4, biased var 5
    assert bn_statistic_loss(x, torch.tensor([4.0]), torch.tensor([5.0])).item() == pytest.approx(0.0, abs=1e-6)
    # the unbiased variance (20/3) would leave a loss of 5/3
    assert bn_statistic_loss(x, torch.tensor([4.0]), torch.tensor([20 / 3])).item() == pytest.approx(5 / 3, rel=1e-5)


class TwoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("multiplier", [1.0, 10.0])
def test_teacher_loss_weighs_first_layer(multiplier, randomize_bn_stats):
    torch.manual_seed(0)
    model = randomize_bn_stats(TwoBN(), seed=5).eval()
    x = torch.randn(3, 2, 6, 6)
    # layer inputs by hand: bn1 sees conv1(x); bn2 sees conv2 of the eval-mode normalized, rectified map
    h1 = model.conv1(x)
    bn1 = model.bn1
    normed = (h1 - bn1.running_mean[None, :, None, None]) / torch.sqrt(bn1.running_var[None, :, None, None] + bn1.eps)
    h2 = model.conv2(torch.relu(normed * bn1.weight[None, :, None, None] + bn1.bias[None, :, None, None]))
    r1 = hand_r(h1.detach(), bn1.running_mean, bn1.running_var)
    r2 = hand_r(h2.detach(), model.bn2.running_mean, model.bn2.running_var)
    assert r1 > 0.1 and r2 > 0.1
    got = teacher_bn_loss(model, x, first_multiplier=multiplier).item()
    assert got == pytest.approx(multiplier * r1 + r2, rel=1e-5)


def test_hooks_are_removed_and_bn_free_model_gives_none(bn_free_model):
    model = TwoBN().eval()
    with BNStatisticHooks(model) as hooks:
        assert hooks.has_bn and len(hooks.layers) == 2
        assert hooks.pop_loss() is None  # nothing ran yet
    assert all(not layer._forward_hooks for layer in bn_layers(model))
    assert bn_layers(bn_free_model) == []
    assert teacher_bn_loss(bn_free_model, torch.randn(2, 1, 8, 8)) is None


def test_loss_has_gradient_towards_the_input():
    model = TwoBN().eval()
    x = torch.randn(2, 2, 5, 5, requires_grad=True)
    teacher_bn_loss(model, x).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_average_modes_with_a_bn_free_teacher():
    a, b = torch.tensor(3.0), torch.tensor(5.0)
    # reference: the BN-free teacher counts in the divisor; bn_only: it does not
    assert average_bn_loss({"p": a, "alexnet": None}, "reference").item() == pytest.approx(1.5)
    assert average_bn_loss({"p": a, "alexnet": None}, "bn_only").item() == pytest.approx(3.0)
    assert average_bn_loss({"p": a, "q": b, "alexnet": None}, "reference").item() == pytest.approx(8 / 3)
    assert average_bn_loss({"p": a, "q": b, "alexnet": None}, "bn_only").item() == pytest.approx(4.0)
    assert average_bn_loss({"p": a, "q": b}, "reference").item() == pytest.approx(4.0)
    assert average_bn_loss({"alexnet": None}, "reference") is None
    with pytest.raises(ValueError, match="bn_average"):
        average_bn_loss({"p": a}, "mean")


@pytest.mark.parametrize("shape", [(4, 3, 5, 7), (6, 5), (3, 4, 9)])
def test_channel_stats_and_gradient_match_var_mean(shape):
    # the fast statistics against torch.var_mean, values and gradients, for 4-D, 2-D and 3-D BN inputs
    from prism_ray.algo.bn_loss import channel_stats

    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).requires_grad_(True)
    gv, gm = torch.randn(shape[1], generator=g, dtype=torch.float64), torch.randn(shape[1], generator=g,
                                                                                  dtype=torch.float64)
    dims = [d for d in range(len(shape)) if d != 1]
    var_ref, mean_ref = torch.var_mean(x, dim=dims, correction=0)
    (grad_ref,) = torch.autograd.grad((var_ref * gv).sum() + (mean_ref * gm).sum(), x)
    var, mean = channel_stats(x)
    (grad,) = torch.autograd.grad((var * gv).sum() + (mean * gm).sum(), x)
    assert var.dtype == mean.dtype == torch.float32  # fp32 statistics whatever the input's dtype
    assert torch.allclose(var.double(), var_ref, rtol=1e-6) and torch.allclose(mean.double(), mean_ref, atol=1e-6)
    assert grad.dtype == x.dtype and torch.allclose(grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_channel_stats_of_bf16_activations_are_fp32_and_close():
    from prism_ray.algo.bn_loss import channel_stats

    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(2)) * 2 + 1
    var, mean = channel_stats(x.to(torch.bfloat16))
    var_ref, mean_ref = torch.var_mean(x.to(torch.bfloat16).float(), dim=[0, 2, 3], correction=0)
    assert var.dtype == torch.float32 and torch.allclose(var, var_ref, rtol=1e-5)
    assert torch.allclose(mean, mean_ref, atol=1e-5)
