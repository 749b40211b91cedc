"""Student training on a distilled set with its soft labels (the evaluate stage's recipe), as plain functions.

One epoch walks the epoch plan's positions in batches of `batch_size` consecutive positions (whole mix
groups): x = the plan's augmented images, target = the soft labels of those positions. Losses:

    mse_ce:  MSE(student logits, teacher logits) + ce_weight * CE(student logits, class label)
    kl:      KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch, not scaled by T^2

The class label in mse_ce is the hard label of the position's own image, even where CutMix pasted another
image into it: what PRISM's and G-VBSM's `mse_gt` loss does. `kl` is SRe2L's validate loss. AdamW or SGD,
weight decay off for norm layers and biases; the learning-rate schedules of `lr_factor`. A batch may run as
several micro-batches whose gradients add up before the optimizer step (`backward_batch`), as the references'
gradient accumulation does, and the student may be scored every few epochs (`scored_epoch`).

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
SCHEDULES = ("cosine", "cosine_epoch", "prism_reference")


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
    # foreach on every device (torch picks it on CUDA only): the same weights to the bit as the per-tensor
    # loop, and a ShuffleNetV2 x0.5 step's update takes 8.3 ms instead of 13.6 on one CPU thread (~170 tensors)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, foreach=True)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")


def lr_factor(step: int, steps_per_epoch: int, epochs: int, schedule: str = "cosine") -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based), in epoch e = step // steps_per_epoch of E.

    cosine: 0.5 (1 + cos(pi t / T)) with t = step, T = epochs * steps_per_epoch; reaches 0 after the last step.
    cosine_epoch: 0.5 (1 + cos(pi e / E)), constant within an epoch (SRe2L's validate/train_FKD.py `--cos`).
    prism_reference: the PRISM authors' per-epoch schedule (validate/train_FKD_parallel.py `--cos`), constant
    within an epoch: 0.5 (1 + cos(pi e / (2.5 E))) while e <= 5E/6, then 0.5 (1 + cos(pi / 3)) (1 - e / E) =
    0.75 (1 - e / E); at E = 300 that is 0.75 at epoch 250, then 0.1225 at epoch 251.
    """
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(step, epochs * steps_per_epoch) / (epochs * steps_per_epoch)))
    e = step // steps_per_epoch
    if schedule == "cosine_epoch":
        return 0.5 * (1.0 + math.cos(math.pi * e / epochs)) if e <= epochs else 0.0
    if schedule == "prism_reference":
        if e <= epochs * 5 / 6:
            return 0.5 * (1.0 + math.cos(math.pi * e / (2.5 * epochs)))
        return 0.5 * (1.0 + math.cos(math.pi * 5 / (6 * 2.5))) * (1.0 - e / epochs)
    raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: "EvaluateConfig", steps_per_epoch: int, *,
                    schedule: Optional[str] = None) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step learning-rate schedule over cfg.epochs (see `lr_factor`; `schedule` overrides cfg.schedule); call
    .step() after every optimizer step."""
    schedule = schedule or cfg.schedule
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


def scored_epoch(epoch: int, epochs: int, every: int) -> bool:
    """Whether the student is scored after epoch `epoch` (0-based) of `epochs`: the references' rule
    `epoch % every == 0 or epoch == epochs - 1` (every = 10: after 1, 11, ..., 291 and 300 epochs trained);
    every = 0 scores after the last epoch only."""
    return epoch == epochs - 1 or (every > 0 and epoch % every == 0)


def backward_batch(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: "EvaluateConfig", *,
                   targets: Optional[torch.Tensor] = None, bf16: bool = False) -> torch.Tensor:
    """The forward and backward passes of one optimizer step's batch; gradients add to the parameters'.

    The batch runs as micro-batches of batch_size / accumulation_steps consecutive images (a shorter last
    batch as fewer, the last of them shorter), each loss divided by accumulation_steps before its backward
    pass: the gradient accumulation of the PRISM and SRe2L validate code, so BatchNorm normalises (and updates
    its running statistics) per micro-batch. With one step it is one pass over the whole batch. `bf16` runs
    the forward pass under bf16 autocast (the loss in fp32). Returns the sum over the batch's images of
    their micro-batch's loss (detached), for the epoch's mean.
    """
    steps = cfg.accumulation_steps
    micro = max(1, cfg.batch_size // steps)
    total = torch.zeros((), device=x.device)
    for s in range(0, x.shape[0], micro):
        e = min(s + micro, x.shape[0])
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x[s:e])
        loss = distill_loss(logits, labels[s:e], cfg, targets=None if targets is None else targets[s:e])
        (loss / steps if steps > 1 else loss).backward()
        total += loss.detach() * (e - s)
    return total


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, images, plan: EpochPlan,
                labels: torch.Tensor, cfg: "EvaluateConfig", *, out_size: int, device: torch.device | str = "cpu",
                targets: Optional[torch.Tensor] = None, channels_last: bool = True) -> float:
    """One epoch over the plan's positions; returns the mean loss per image.

    images: an `ImageSource` (a uint8 set resident on the device, or encoded) or a normalized float tensor.
    labels: dense float32 (N, K) teacher logits in position order; targets: (N,) class of each image, in
    image order (the set's order, not the plan's), needed by mse_ce. The plan, labels and targets go to the
    device once per epoch and batches are augmented there, so with a resident set no batch crosses from
    the host and nothing waits on the device until the epoch's loss is read. Each batch is augmented whole
    (its CutMix groups), then `backward_batch` runs it in cfg.accumulation_steps micro-batches, under bf16
    autocast when cfg.precision is 'bf16'. `channels_last` lays out batches NHWC, as `train_student` lays out
    the model: on CUDA and on the CPU (oneDNN) convolutions run faster that way.
    """
    if cfg.batch_size % plan.mix_group:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the plan's mix_group {plan.mix_group}")
    if cfg.batch_size % cfg.accumulation_steps:
        raise ValueError(f"batch_size {cfg.batch_size} must split into {cfg.accumulation_steps} equal micro-batches")
    n = len(plan)
    if labels.shape[0] != n:
        raise ValueError(f"labels have {labels.shape[0]} rows, the epoch has {n} positions")
    device = torch.device(device)
    source = as_source(images)
    bf16 = cfg.precision == "bf16"
    on_device = plan.to(device)
    labels = labels.to(device, torch.float32, non_blocking=True)
    targets = targets.to(device, non_blocking=True) if targets is not None else None
    model.train()
    total = torch.zeros((), device=device)
    ranges = [(s, min(s + cfg.batch_size, n)) for s in range(0, n, cfg.batch_size)]
    for (start, stop), pixels in zip(ranges, source.batches(plan.order, ranges, device)):
        x = augment_batch(pixels, on_device, start, stop, out_size, source.normalization)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = targets[on_device.order[start:stop]] if targets is not None else None
        optimizer.zero_grad(set_to_none=True)
        total += backward_batch(model, x, labels[start:stop], cfg, targets=y, bf16=bf16)
        optimizer.step()
        scheduler.step()
    return float(total) / n  # the epoch's only device -> host sync


def train_student(model: nn.Module, images, label_fn: Callable[[int], tuple[EpochPlan, torch.Tensor]],
                  cfg: "EvaluateConfig", *, out_size: int, device: torch.device | str = "cpu",
                  state: Optional[dict] = None, on_epoch_end: Optional[Callable[[int, dict], None]] = None,
                  targets: Optional[torch.Tensor] = None, seed: int = 0, schedule: Optional[str] = None,
                  channels_last: bool = True, score: Optional[Callable[[nn.Module], dict]] = None) -> dict:
    """Train epochs state['epoch'] .. cfg.epochs - 1; label_fn(epoch) gives the epoch's plan and dense labels.

    state (a checkpoint: 'model', 'optimizer', 'scheduler' state dicts, 'epoch', the next epoch to run, and
    'scores') resumes exactly. `score(model)` (e.g. top-1/top-5 on the validation set) runs after every epoch
    `scored_epoch` picks for cfg.eval_every; {'epoch': epochs trained, **score(model)} is kept, in order, in
    state['scores'] and returned as 'scores'. on_epoch_end(epoch, state) follows every epoch (and its
    scoring); its state holds live references to the model's and optimizer's tensors, so serialize or copy
    it there. `seed` seeds the torch RNG of each epoch (dropout). `schedule` overrides cfg.schedule.
    images: an `ImageSource` or a normalized float tensor (see `train_epoch`, also for cfg.precision and
    `channels_last`: NHWC model and batches, on every device). Returns {'epochs_run', 'final_loss', 'seconds', 'state',
    'scores'}.
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    model.to(device)
    if channels_last:  # NHWC: 1.3-1.8x faster training on the CPU as on GPUs (docs/benchmarks.md)
        model.to(memory_format=torch.channels_last)
    n = len(images)
    targets = None if targets is None else torch.as_tensor(targets, dtype=torch.int64)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, math.ceil(n / cfg.batch_size), schedule=schedule or cfg.schedule)
    first, scores = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first = int(state["epoch"])
        scores = [dict(s) for s in state.get("scores", [])]
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
                               device=device, targets=targets, channels_last=channels_last)
        if score is not None and scored_epoch(epoch, cfg.epochs, cfg.eval_every):
            scores.append({"epoch": epoch + 1, **score(model)})
        current = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "scores": list(scores)}
        if on_epoch_end is not None:
            on_epoch_end(epoch, current)
    model.eval()
    if current is None:
        current = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "epoch": first, "scores": list(scores)}
    return {"epochs_run": max(cfg.epochs - first, 0), "final_loss": loss, "seconds": time.perf_counter() - t0,
            "state": current, "scores": scores}
