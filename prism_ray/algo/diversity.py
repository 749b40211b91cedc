"""Diversity of a synthetic set: per class, how alike a reference network finds its images.

Features are the input of the network's final linear layer (its penultimate representation). A class's
score is the mean cosine similarity over all pairs of its images: 1 when every image looks the same to
the network, about 0 for unrelated directions; lower is more diverse. `class_diversity` takes the images at
once (small sets); `streamed_class_diversity` takes batches and holds only per-class sums (real data at
ImageNet scale, where stacking 100 images per class would take 60 GB as float32).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def final_linear(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear in module order: the classifier head of every registry architecture."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take penultimate features from")
    return linears[-1]


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
                         device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, D) float32 CPU features of x: what the final linear layer receives, with the model in eval mode."""
    device = torch.device(device)
    head = final_linear(model)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(x), batch_size):
            captured.clear()
            model(x[start:start + batch_size].to(device))
            if len(captured) != 1:
                raise RuntimeError(f"the final linear layer ran {len(captured)} times in one forward pass")
            out.append(captured[0].flatten(1).to("cpu", torch.float32))
    finally:
        handle.remove()
        model.train(was_training)
    if not out:
        return torch.zeros(0, head.in_features)
    return torch.cat(out)


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean over pairs i < j of cos(f_i, f_j); nan for fewer than two rows. A zero row counts as cosine 0.

    Uses sum_{i != j} z_i . z_j = |sum_i z_i|^2 - sum_i |z_i|^2 on unit rows z_i, in float64.
    """
    n = features.shape[0]
    if n < 2:
        return float("nan")
    z = F.normalize(features.reshape(n, -1).double(), dim=1)
    off_diagonal = z.sum(0).square().sum() - z.square().sum()
    return float(off_diagonal / (n * (n - 1)))


def class_diversity(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                    device: torch.device | str = "cpu") -> dict[int, float]:
    """class -> mean pairwise cosine similarity of the penultimate features of that class's images."""
    feats = penultimate_features(model, images, batch_size=batch_size, device=device)
    labels = torch.as_tensor(labels).cpu()
    return {int(c): mean_pairwise_cosine(feats[labels == c]) for c in torch.unique(labels).tolist()}


class ClassCosine:
    """The per-class mean pairwise cosine, accumulated batch by batch: exact, in O(classes x features) memory.

    For unit rows z_i of a class, sum_{i != j} z_i . z_j = |sum_i z_i|^2 - sum_i |z_i|^2, so the sum of the
    unit vectors, the sum of their squared norms (1, or 0 for a zero row) and the count suffice. Sums are
    float64; the result equals `mean_pairwise_cosine` on the stacked features up to summation order
    (a few 1e-16 relative).
    """

    def __init__(self):
        self._sum: dict[int, torch.Tensor] = {}
        self._sq: dict[int, float] = {}
        self._count: dict[int, int] = {}

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold in a batch: features (B, D) and their classes (B,)."""
        z = F.normalize(features.reshape(features.shape[0], -1).double(), dim=1)
        labels = torch.as_tensor(labels).to(z.device)
        for c in torch.unique(labels).tolist():
            zc = z[labels == c]
            self._sum[c] = zc.sum(0) + self._sum[c] if c in self._sum else zc.sum(0)
            self._sq[c] = self._sq.get(c, 0.0) + float(zc.square().sum())
            self._count[c] = self._count.get(c, 0) + zc.shape[0]

    def result(self) -> dict[int, float]:
        """class -> mean pairwise cosine (nan below two images), classes in ascending order."""
        out = {}
        for c in sorted(self._count):
            n = self._count[c]
            off = float(self._sum[c].square().sum()) - self._sq[c]
            out[c] = off / (n * (n - 1)) if n >= 2 else float("nan")
        return out

    def count(self, class_id: int) -> int:
        return self._count.get(class_id, 0)


def streamed_class_diversity(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                             device: torch.device | str = "cpu") -> ClassCosine:
    """`class_diversity` over (images, labels) batches as they come (a DataLoader, a set's batches): nothing
    but one batch and the per-class sums is held. Returns the accumulator (`.result()`, `.count(c)`)."""
    acc = ClassCosine()
    for x, y in batches:
        acc.add(penultimate_features(model, x, batch_size=len(x), device=device), y)
    return acc
