"""Fixtures of the recover engine's tests: tiny hand-checkable teachers and a Fashion-MNIST teacher pool."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from prism_ray.algo.teachers import ConvNet, freeze
from prism_ray.data.base import Normalization

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # With another busy process on a 2-core machine, two OpenMP threads stall each other at every op
    # barrier (measured: mobilenet_v2 forward 16 ms with one thread, 2 s with two); one thread is robust.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class NoBN(nn.Module):
    """A teacher without BatchNorm layers (alexnet's role in the reference pool)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def randomize_bn_stats(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics, so that the BN loss is not the same for every layer."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def tiny_pool(num_classes: int = 10, in_channels: int = 1) -> dict[str, nn.Module]:
    """Four small frozen teachers: three with BN layers of different shapes, one without."""
    torch.manual_seed(0)
    return {
        "primary": freeze(randomize_bn_stats(ConvNet(num_classes, in_channels, width=8, depth=2), 1)),
        "bn_a": freeze(randomize_bn_stats(ConvNet(num_classes, in_channels, width=6, depth=2), 2)),
        "bn_b": freeze(randomize_bn_stats(ConvNet(num_classes, in_channels, width=4, depth=3), 3)),
        "no_bn": freeze(NoBN(num_classes, in_channels)),
    }


@pytest.fixture
def bn_free_model() -> nn.Module:
    return freeze(NoBN())


@pytest.fixture(name="randomize_bn_stats")
def randomize_bn_stats_fixture():
    return randomize_bn_stats


@pytest.fixture(scope="module")
def pool() -> dict[str, nn.Module]:
    return tiny_pool()


@pytest.fixture
def norm() -> Normalization:
    return Normalization((0.2860,), (0.3530,))


@pytest.fixture(scope="session")
def fashion_mnist_pool():
    """convnet, mobilenet_v2 and shufflenet_v2_x0_5 trained on 300 Fashion-MNIST images per class, BN recalibrated.

    Returns (pool, training set, seconds spent). The convnet gets 3 epochs: after 1 it is a weak primary
    (~62% validation top-1) whose logits cannot become confident, which is a test of the teacher, not of
    the engine.
    """
    from prism_ray.algo.teachers import ModelShape, build_model
    from prism_ray.algo.train import recalibrate_bn, train_classifier
    from prism_ray.config import DataConfig
    from prism_ray.data import build_dataset

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train = build_dataset(DataConfig(root=FMNIST_ROOT, max_per_class=300), "train")
    x, y = train.tensors()
    shape = ModelShape(train.num_classes, 1, 28)
    pool = {}
    for i, (arch, epochs) in enumerate([("convnet", 3), ("mobilenet_v2", 1), ("shufflenet_v2_x0_5", 1)]):
        torch.manual_seed(i)
        model = build_model(arch, shape)
        train_classifier(model, (x, y), epochs=epochs, batch_size=64, lr=0.05, seed=i)
        recalibrate_bn(model, (x, y), batch_size=500, max_images=len(x))
        pool[arch] = freeze(model)
    torch.set_num_threads(before)
    return pool, train, time.perf_counter() - t0
