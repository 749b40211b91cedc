"""Student training on a distilled set with its soft labels (the evaluate stage's recipe), as plain functions.

One epoch walks the epoch plan's positions in batches of `batch_size` consecutive positions (whole mix
groups): x = the plan's augmented images, target = the soft labels of those positions. Losses:

    mse_ce:  MSE(student logits, teacher logits) + ce_weight * CE(student logits, class label)
    kl:      KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch, not scaled by T^2

The class label in mse_ce is the hard label of the position's own image, even where CutMix pasted another
image into it: what PRISM's and G-VBSM's `mse_gt` loss does. `kl` is SRe2L's validate loss. AdamW or SGD,
weight decay off for norm layers and biases, cosine learning rate per step without warm-up.

Resumable exactly: the only randomness is the epoch plan (seeded by the caller) and, for students with
dropout, the torch RNG, which each epoch reseeds inside a forked RNG from (seed, epoch).
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from prism_ray.algo.seeding import derive_seed
from prism_ray.algo.image_source import as_source
from prism_ray.algo.soft_labels import EpochPlan, augment_batch
from prism_ray.algo.teachers import ModelShape, build_model

if TYPE_CHECKING:  # types only: the engine does not need the config loader
    from prism_ray.config import EvaluateConfig

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
SCHEDULES = ("cosine", "prism_reference")


def build_student(arch: str, shape: ModelShape, seed: int) -> nn.Module:
    """A fresh `arch` initialised from `seed` without touching the global RNG."""
    return build_model(arch, shape, seed=seed)


def no_decay_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that get no weight decay: those of norm layers, and every bias."""
    ids = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or name == "bias":
                ids.add(id(p))
    return ids


def build_optimizer(model: nn.Module, cfg: "EvaluateConfig") -> torch.optim.Optimizer:
    """AdamW, or SGD with momentum 0.9; with no_decay_norm_bias, group 0 decays and group 1 (norms, biases) not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.no_decay_norm_bias:
        skip = no_decay_parameters(model)
        groups = [{"params": [p for p in params if id(p) not in skip], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")


def lr_factor(step: int, steps_per_epoch: int, epochs: int, schedule: str = "cosine") -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based).

    cosine: 0.5 (1 + cos(pi t / T)) with t = step, T = epochs * steps_per_epoch; reaches 0 after the last step.
    prism_reference: the PRISM authors' per-epoch schedule (validate/train_FKD_parallel.py), constant within
    epoch e: 0.5 (1 + cos(pi e / (2.5 E))) while e <= 5E/6, then 0.75 (1 - e / E), a drop from 0.75 to 0.125.
    """
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, epochs * steps_per_epoch) / (epochs * steps_per_epoch)))
    if schedule == "prism_reference":
        e = step // steps_per_epoch
        if e <= epochs * 5 / 6:
            return 0.5 * (1.0 + math.cos(math.pi * e / (2.5 * epochs)))
        return 0.5 * (1.0 + math.cos(math.pi * 5 / (6 * 2.5))) * (1.0 - e / epochs)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "EvaluateConfig", steps_per_epoch: int, *,
                    schedule: str = "cosine") -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule over cfg.epochs (see `lr_factor`); call .step() after every optimizer step."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    epochs = cfg.epochs
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, epochs,
                                                                               schedule))


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, cfg: "EvaluateConfig", *,
                 targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The batch's loss. mse_ce: mean squared error over all B x K logits + ce_weight * cross-entropy with the
    hard class labels `targets` (B,); kl: batch-mean KL(softmax(t / T) || softmax(s / T)), no T^2 factor."""
    s, t = student_logits.float(), teacher_logits.float()
    if cfg.loss == "mse_ce":
        loss = F.mse_loss(s, t)
        if cfg.ce_weight:
            if targets is None:
                raise ValueError("loss 'mse_ce' needs the images' class labels (targets=...) for its "
                                 "cross-entropy term; set evaluate.ce_weight: 0 to train on the soft labels only")
            loss = loss + cfg.ce_weight * F.cross_entropy(s, targets)
        return loss
    if cfg.loss == "kl":
        temp = cfg.temperature
        return F.kl_div(F.log_softmax(s / temp, dim=1), F.log_softmax(t / temp, dim=1), reduction="batchmean",
                        log_target=True)
    raise ValueError(f"loss must be 'mse_ce' or 'kl', got {cfg.loss!r}")


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, images, plan: EpochPlan,
                labels: torch.Tensor, cfg: "EvaluateConfig", *, out_size: int, device: torch.device | str = "cpu",
                targets: Optional[torch.Tensor] = None, amp: bool = True, channels_last: bool = True) -> float:
    """One epoch over the plan's positions; returns the mean loss per image.

    images: an `ImageSource` (a uint8 set resident on the device, or encoded) or a normalized float tensor.
    labels: dense float32 (N, K) teacher logits in position order; targets: (N,) class of each image, in
    image order (the set's order, not the plan's), needed by mse_ce. The plan, labels and targets go to the
    device once per epoch and batches are augmented there, so with a resident set no batch crosses from
    the host and nothing waits on the device until the epoch's loss is read. On CUDA, `amp` runs the
    forward in bf16 autocast (the loss in float32) and `channels_last` lays out model and batches NHWC.
    """
    if cfg.batch_size % plan.mix_group:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the plan's mix_group {plan.mix_group}")
    n = len(plan)
    if labels.shape[0] != n:
        raise ValueError(f"labels have {labels.shape[0]} rows, the epoch has {n} positions")
    device = torch.device(device)
    source = as_source(images)
    cuda = device.type == "cuda"
    on_device = plan.to(device)
    labels = labels.to(device, torch.float32, non_blocking=True)
    targets = targets.to(device, non_blocking=True) if targets is not None else None
    model.train()
    total = torch.zeros((), device=device)
    ranges = [(s, min(s + cfg.batch_size, n)) for s in range(0, n, cfg.batch_size)]
    for (start, stop), pixels in zip(ranges, source.batches(plan.order, ranges, device)):
        x = augment_batch(pixels, on_device, start, stop, out_size, source.normalization)
        if cuda and channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = targets[on_device.order[start:stop]] if targets is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and amp):
            logits = model(x)
        loss = distill_loss(logits, labels[start:stop], cfg, targets=y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.detach() * (stop - start)
    return float(total) / n  # the epoch's only device -> host sync


def train_student(model: nn.Module, images, label_fn: Callable[[int], tuple[EpochPlan, torch.Tensor]],
                  cfg: "EvaluateConfig", *, out_size: int, device: torch.device | str = "cpu",
                  state: Optional[dict] = None, on_epoch_end: Optional[Callable[[int, dict], None]] = None,
                  targets: Optional[torch.Tensor] = None, seed: int = 0, schedule: str = "cosine",
                  amp: bool = True, channels_last: bool = True) -> dict:
    """Train epochs state['epoch'] .. cfg.epochs - 1; label_fn(epoch) gives the epoch's plan and dense labels.

    state (a checkpoint: 'model', 'optimizer', 'scheduler' state dicts and 'epoch', the next epoch to run)
    resumes exactly. on_epoch_end(epoch, state) follows every epoch; its state holds live references to
    the model's and optimizer's tensors, so serialize or copy it there. `seed` seeds the torch RNG of each
    epoch (dropout). images: an `ImageSource` or a normalized float tensor (see `train_epoch`, also for `amp`
    and `channels_last`, which apply on CUDA only). Returns {'epochs_run', 'final_loss', 'seconds', 'state'}.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    model.to(device)
    if device.type == "cuda" and channels_last:
        model.to(memory_format=torch.channels_last)
    n = len(images)
    targets = None if targets is None else torch.as_tensor(targets, dtype=torch.int64)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, math.ceil(n / cfg.batch_size), schedule=schedule)
    first = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first = int(state["epoch"])
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    loss, current = float("nan"), state
    for epoch in range(first, cfg.epochs):
        plan, labels = label_fn(epoch)
        if len(plan) != n:
            raise ValueError(f"epoch {epoch}: the plan has {len(plan)} positions, the set {n} images")
        with torch.random.fork_rng(devices=rng_devices):
            torch.manual_seed(derive_seed(seed, "student", epoch))
            loss = train_epoch(model, optimizer, scheduler, images, plan, labels, cfg, out_size=out_size,
                               device=device, targets=targets, amp=amp, channels_last=channels_last)
        current = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "epoch": epoch + 1}
        if on_epoch_end is not None:
            on_epoch_end(epoch, current)
    model.eval()
    if current is None:
        current = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "epoch": first}
    return {"epochs_run": max(cfg.epochs - first, 0), "final_loss": loss, "seconds": time.perf_counter() - t0,
            "state": current}
