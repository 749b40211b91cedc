"""Plain supervised training and evaluation of a classifier (the squeeze stage's recipe).

Works on in-memory tensors (small data sets) or any map-style dataset of (image, label) pairs. Training is a
pure function of its seed: batch order and flips come from a seeded generator, and the global torch RNG that
dropout draws from is reseeded every epoch inside a forked RNG (so the caller's RNG is left alone).
"""
from __future__ import annotations

import math
import time
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prism_ray.algo.image_source import stream
from prism_ray.algo.seeding import derive_seed


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterable[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def _fetch(data, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, tuple):
        x, y = data
        return x[idx], y[idx]
    items = [data[int(i)] for i in idx]
    return torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])


def _length(data) -> int:
    return len(data[0]) if isinstance(data, tuple) else len(data)


def _memory_format(model: nn.Module) -> torch.memory_format:
    """How to lay out the batches `model` scores: NHWC (channels_last) unless a convolution weight is NCHW only.
    A student trained NHWC scores its batches NHWC too, which halves the CPU's scoring time (docs/benchmarks.md).
    Weights with one input channel or 1x1 kernels are both at once: a model of only those takes NHWC."""
    convs = [p for p in model.parameters() if p.dim() == 4]
    nchw_only = any(p.is_contiguous() and not p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    return torch.channels_last if convs and not nchw_only else torch.contiguous_format


def train_classifier(model: nn.Module, data, *, epochs: float, batch_size: int, lr: float, momentum: float = 0.9,
                     weight_decay: float = 5e-4, label_smoothing: float = 0.0, seed: int = 0,
                     device: torch.device | str = "cpu", flip: bool = True, log_every: int = 0,
                     channels_last: bool = True) -> dict:
    """SGD with a cosine schedule over `epochs` passes (fractions allowed) of `data`: (x, y) tensors or a dataset.

    `channels_last` trains the model and its batches NHWC, faster on the CPU (oneDNN) as on GPUs; the model
    stays NHWC afterwards (`evaluate_classifier` and `recalibrate_bn` follow its layout).
    Returns the mean loss of the last 10% of steps and the wall time.
    """
    device = torch.device(device)
    model.to(device).train()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    g = torch.Generator().manual_seed(seed)
    n = _length(data)
    steps_per_epoch = math.ceil(n / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    losses: list[float] = []
    step, epoch, t0 = 0, 0, time.perf_counter()
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        while step < total:
            torch.manual_seed(derive_seed(seed, "train-epoch", epoch))  # dropout's draws, per epoch
            for idx in _batches(n, batch_size, g):
                if step >= total:
                    break
                x, y = _fetch(data, idx)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if flip:
                    mask = torch.rand(x.shape[0], generator=g) < 0.5
                    x = torch.where(mask.to(device)[:, None, None, None], x.flip(-1), x)
                x = x.contiguous(memory_format=layout)
                loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                if log_every and step % log_every == 0:
                    print(f"  step {step}/{total} loss {sum(losses[-log_every:]) / log_every:.4f}", flush=True)
            epoch += 1
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": total, "final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data, *, batch_size: int = 256, max_images: int = 4096,
                   device: torch.device | str = "cpu") -> int:
    """Recompute every BatchNorm layer's running statistics as exact averages over training images.

    After a short training run the running statistics lag behind the weights (momentum 0.1 averages over
    old weights); recover's BN alignment pulls synthetic images towards those statistics, so they must
    describe the final network. Returns the number of images used.
    """
    device = torch.device(device)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches seen
    model.to(device).eval()
    for m in bns:  # only BN layers in training mode: dropout stays off, so the statistics draw nothing random
        m.train()
    n = min(_length(data), max_images)
    seen = 0
    layout = _memory_format(model)
    for idx in _batches(n, batch_size, torch.Generator().manual_seed(0)):
        x, _ = _fetch(data, idx)
        model(x.to(device).contiguous(memory_format=layout))
        seen += len(idx)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()
    return seen


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data, *, batch_size: int = 500, device: torch.device | str = "cpu",
                        topk: Sequence[int] = (1, 5), num_workers: int = 0) -> dict[str, float]:
    """Top-k accuracies of `model` on (x, y) tensors or a dataset, as fractions in [0, 1].

    A dataset is streamed through `stream` (num_workers loader processes): memory does not grow with its
    size. Hits are counted on the device and read once at the end.
    """
    device = torch.device(device)
    model.to(device).eval()
    n = _length(data)
    if isinstance(data, tuple):
        batches = (_fetch(data, idx) for idx in _batches(n, batch_size, None))
    else:
        batches = stream(data, batch_size, num_workers=num_workers, device=device)
    hits = {k: torch.zeros((), dtype=torch.int64, device=device) for k in topk}
    layout = _memory_format(model)
    for x, y in batches:
        logits = model(x.to(device, non_blocking=True).contiguous(memory_format=layout))
        y = y.to(device, non_blocking=True)
        k_max = min(max(topk), logits.shape[1])
        top = logits.topk(k_max, dim=1).indices
        for k in topk:
            hits[k] += (top[:, :min(k, k_max)] == y[:, None]).any(1).sum()
    return {f"top{k}": int(hits[k]) / max(n, 1) for k in topk}
