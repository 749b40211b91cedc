"""Diversity: penultimate features of every architecture, and the mean pairwise cosine similarity."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prism_ray.algo.diversity import (ClassCosine, class_diversity, final_linear, mean_pairwise_cosine,
                                     penultimate_features, streamed_class_diversity)
from prism_ray.algo.student import build_student
from prism_ray.algo.teachers import ModelShape


@pytest.mark.parametrize("arch", ["convnet", "resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "alexnet"])
def test_penultimate_features_are_what_the_head_reads(arch):
    model = build_student(arch, ModelShape(10, 1, 28), seed=0)
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    model.train()
    feats = penultimate_features(model, x, batch_size=2)
    head = final_linear(model)
    assert feats.shape == (5, head.in_features) and feats.dtype == torch.float32
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.no_grad():
        assert torch.allclose(head(feats), model(x), atol=1e-5)


def test_mean_pairwise_cosine_by_hand():
    assert mean_pairwise_cosine(torch.tensor([[1.0, 2.0, 3.0]] * 4)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(3)) == pytest.approx(0.0)
    # pairs: (1,0)-(1,1): 1/sqrt2, (1,0)-(0,1): 0, (1,1)-(0,1): 1/sqrt2
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [3.0, 3.0], [0.0, 0.5]])) == pytest.approx(math.sqrt(2) / 3)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(-1.0)
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 3)))
    assert math.isnan(mean_pairwise_cosine(torch.ones(0, 3)))


def test_class_diversity_per_class():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))  # features = the flattened images
    same = [1.0, 2.0, 0.0, 1.0]
    rows = [same, same, [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], same]  # class 3 alike, class 0 orthogonal
    images = torch.tensor(rows).reshape(5, 1, 2, 2)
    labels = torch.tensor([3, 3, 0, 0, 7])
    got = class_diversity(model, images, labels, batch_size=2)
    assert list(got) == [0, 3, 7]
    assert got[3] == pytest.approx(1.0) and got[0] == pytest.approx(0.0) and math.isnan(got[7])


def test_accumulated_class_cosine_equals_the_stacked_computation():
    """ClassCosine folds batches into per-class sums: equal to mean_pairwise_cosine on all rows at once up to
    summation order (bound 1e-12 here, values in [-1, 1])."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(203, 16, generator=g)
    feats[7] = 0  # a zero row counts as cosine 0 with everything
    labels = torch.randint(0, 5, (203,), generator=g)
    labels[-1] = 9  # a class with one image: nan
    acc = ClassCosine()
    for s in range(0, 203, 37):
        acc.add(feats[s:s + 37], labels[s:s + 37])
    got = acc.result()
    assert list(got) == [0, 1, 2, 3, 4, 9] and math.isnan(got[9]) and acc.count(9) == 1
    for c in range(5):
        assert got[c] == pytest.approx(mean_pairwise_cosine(feats[labels == c]), abs=1e-12)
        assert acc.count(c) == int((labels == c).sum())


def test_streamed_diversity_equals_class_diversity():
    model = build_student("convnet", ModelShape(4, 1, 12), seed=0)
    g = torch.Generator().manual_seed(2)
    images, labels = torch.randn(50, 1, 12, 12, generator=g), torch.randint(0, 4, (50,), generator=g)
    whole = class_diversity(model, images, labels, batch_size=50)
    streamed = streamed_class_diversity(model, ((images[s:s + 8], labels[s:s + 8]) for s in range(0, 50, 8)))
    assert list(streamed.result()) == list(whole)
    for c, v in whole.items():
        assert streamed.result()[c] == pytest.approx(v, abs=1e-12)
