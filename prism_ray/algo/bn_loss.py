"""BN alignment: how far a batch's per-channel statistics lie from what a teacher saw in training.

For each BatchNorm layer l of a teacher, with x_l the layer's input,

    R_l = || mean(x_l) - running_mean_l ||_2 + || var(x_l) - running_var_l ||_2

(mean and biased variance per channel over batch and space). A teacher's BN loss is sum_l w_l R_l with
w_0 = first_multiplier for its first BN layer (in module order) and 1 elsewhere. Several teachers are
combined by `average_bn_loss`.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers of `model` that keep running statistics, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


def _stats_shape(x: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _one_pass_backward(ctx, grad_var: torch.Tensor, grad_mean: torch.Tensor) -> torch.Tensor:
    """d/dx (g_var . var + g_mean . mean) = g_var * 2 (x - mean) / n + g_mean / n per channel: one pass over x,
    in fp32, stored in x's dtype and memory format."""
    x, mean = ctx.saved_tensors
    n = x.numel() // x.shape[1]
    shape = _stats_shape(x)
    a = grad_var * (2.0 / n)
    b = grad_mean / n - a * mean
    if torch.compiler.is_compiling():  # the compiler fuses the cast; out= is for eager mode
        return torch.addcmul(b.view(shape), x, a.view(shape)).to(x.dtype)
    return torch.addcmul(b.view(shape), x, a.view(shape), out=torch.empty_like(x))


class _ChannelSums(torch.autograd.Function):
    """Mean, then the mean of the centred squares, as fp32 sums (the CPU path)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims, dtype=torch.float32)
        var = (x - mean.view(_stats_shape(x))).square_().mean(dims, dtype=torch.float32)
        ctx.save_for_backward(x, mean)
        return var, mean

    backward = staticmethod(_one_pass_backward)


class _ChannelStatsCUDA(torch.autograd.Function):
    """One read of the activation by the batch-norm statistics kernel: fp32 mean and 1/std for any float
    dtype and memory format (the CUDA path)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        mean, invstd = torch.batch_norm_stats(x, 0.0)
        var = torch.where(invstd > 0, invstd.pow(-2), torch.zeros_like(invstd))  # 1/std = 0: a constant channel
        ctx.save_for_backward(x, mean)
        return var, mean

    backward = staticmethod(_one_pass_backward)


_CUDA_STATS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(biased variance, mean) per channel (dim 1) over every other dim, fp32, differentiable in x.

    Replaces torch.var_mean, whose Welford reduction over (N, H, W) of an NCHW tensor runs 3-7x slower on CPU
    than sums and took over a third of a 224-px synthesis step (docs/recover.md, "Speed"); the CPU sums agree
    with it to ~1e-7. On CUDA one kernel reads a bf16 activation once, where var_mean needed an fp32 copy.
    The backward is one fused pass instead of autograd's several full-size temporaries.
    """
    if x.is_cuda and x.dtype in _CUDA_STATS_DTYPES and x.dim() >= 2:
        return _ChannelStatsCUDA.apply(x)
    return _ChannelSums.apply(x)


def bn_statistic_loss(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """||mean - running_mean||_2 + ||biased var - running_var||_2 of `x` per channel (dim 1), in fp32."""
    # fp32 whatever autocast made of the activations: the statistics are what the loss is about
    var, mean = channel_stats(x)
    return (torch.linalg.vector_norm(mean - running_mean.float())
            + torch.linalg.vector_norm(var - running_var.float()))


class BNStatisticHooks:
    """Forward hooks on every BN layer of one teacher; after its forward pass, `pop_loss()` is its BN loss."""

    def __init__(self, model: nn.Module, first_multiplier: float = 10.0):
        self.layers = bn_layers(model)
        self.weights = [first_multiplier] + [1.0] * (len(self.layers) - 1) if self.layers else []
        self._terms: dict[int, torch.Tensor] = {}
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self._terms[index] = bn_statistic_loss(inputs[0], module.running_mean, module.running_var)
        return record

    @property
    def has_bn(self) -> bool:
        return bool(self.layers)

    def pop_loss(self) -> Optional[torch.Tensor]:
        """The weighted sum over the layers that ran since the last call (None if none did); clears them."""
        if not self._terms:
            return None
        terms, self._terms = self._terms, {}
        total = None
        for i, weight in enumerate(self.weights):  # module order, a plain loop: torch.compile traces it whole
            if i in terms:
                total = weight * terms[i] if total is None else total + weight * terms[i]
        return total

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._terms = [], {}

    def __enter__(self) -> "BNStatisticHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def teacher_bn_loss(model: nn.Module, x: torch.Tensor, first_multiplier: float = 10.0) -> Optional[torch.Tensor]:
    """One forward of `model` on `x` and its BN loss (None for a model without BN layers)."""
    with BNStatisticHooks(model, first_multiplier) as hooks:
        model(x)
        return hooks.pop_loss()


def average_bn_loss(losses: Mapping[str, Optional[torch.Tensor]], mode: str) -> Optional[torch.Tensor]:
    """Mean BN loss over teachers; None marks a teacher without BN layers.

    mode 'bn_only' divides by the number of teachers with BN layers; 'reference' divides by all teachers
    drawn, as the authors' code does (a BN-free alexnet then halves the term without adding to it).
    Returns None when no teacher contributes a BN loss.
    """
    if mode not in ("bn_only", "reference"):
        raise ValueError(f"bn_average must be 'bn_only' or 'reference', got {mode!r}")
    present = [v for v in losses.values() if v is not None]
    if not present:
        return None
    divisor = len(losses) if mode == "reference" else len(present)
    return sum(present) / divisor
