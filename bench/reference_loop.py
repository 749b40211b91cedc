"""A recover loop that pays the PRISM reference code's costs (recover/data_synthesis.py), for side-by-side timing.

Written here from the reference's structure, not copied: per IPC index every teacher is rebuilt (the
torchvision constructor initialises it, then the weights are read from a file, as `pretrained=True` reads
the hub cache) and wrapped in DataParallel; the primary runs twice per step (once for the logits, once as
`model_teacher_2` for its BN statistics); every drawn teacher runs, a BN-free one (alexnet) too; BN
statistics come from the reference's hook (a mean, then a permuted contiguous copy for the variance);
image priors and the image norm are computed every step although their weights are 0; the loss is read
to the host every step (`best_cost > loss.item()`) and the images cloned; every 100 steps three losses
are printed (read) and a MobileNetV2 verifier runs; everything is fp32. Images are saved by truncation
to 8 bits and Pillow's JPEG.

The objective is the engine's with `bn_average: reference`; the views (crop, flip, roll) and teacher draws
come from the same seeded generators as the engine's, so both loops do the same work per step.
"""
from __future__ import annotations

import io
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import nn

from prism_ray.algo.augment import draw_view
from prism_ray.algo.seeding import generator
from prism_ray.algo.synthesize import ShardSpec, initial_images
from prism_ray.algo.teachers import ModelShape, build_model

SAVE_EVERY = 100
VERIFIER = "mobilenet_v2"


class ReferenceBNHook:
    """The reference's BNFeatureHook: batch mean, and the variance of a permuted contiguous copy."""

    def __init__(self, module: nn.Module):
        self.r_feature = None
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module, inputs, output):
        x = inputs[0]
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)

    def close(self):
        self.hook.remove()


def load_like_reference(arch: str, weights: str, shape: ModelShape, device: torch.device) -> nn.Module:
    """Build, initialise and load a teacher as `models.__dict__[arch](pretrained=True)` + DataParallel does."""
    model = build_model(arch, shape)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model = nn.DataParallel(model).to(device) if device.type == "cuda" else nn.DataParallel(model, device_ids=[])
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    return model


def image_prior_losses(x: torch.Tensor):
    d1 = x[:, :, :, :-1] - x[:, :, :, 1:]
    d2 = x[:, :, :-1, :] - x[:, :, 1:, :]
    d3 = x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    d4 = x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    l2 = torch.norm(d1) + torch.norm(d2) + torch.norm(d3) + torch.norm(d4)
    l1 = ((d1.abs() / 255.0).mean() + (d2.abs() / 255.0).mean() + (d3.abs() / 255.0).mean()
          + (d4.abs() / 255.0).mean()) * 255.0
    return l1, l2


def reference_shard(weights: dict[str, str], primary: str, extras: Sequence[str], spec: ShardSpec, cfg,
                    mean: Sequence[float], std: Sequence[float], shape: ModelShape, device: torch.device | str = "cpu",
                    init: Optional[torch.Tensor] = None, iterations: Optional[int] = None,
                    archs: Optional[dict[str, str]] = None) -> dict:
    """One shard the reference's way. weights: teacher name -> state_dict file; extras: the drawn teachers.

    Returns {'images' (CPU, normalized), 'encoded', 'seconds': {'load', 'steps', 'save', 'total'},
    'iterations', 'loss'}.
    """
    device = torch.device(device)
    archs = archs or {n: n for n in weights}
    t0 = time.perf_counter()
    model_teacher = load_like_reference(archs[primary], weights[primary], shape, device)
    model_teacher_2 = load_like_reference(archs[primary], weights[primary], shape, device)  # the primary again
    others = [load_like_reference(archs[n], weights[n], shape, device) for n in extras]
    verifier = load_like_reference(archs.get(VERIFIER, VERIFIER), weights[VERIFIER], shape, device) \
        if VERIFIER in weights else None
    hooks = [[ReferenceBNHook(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
             for model in (model_teacher_2, *others)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_load = time.perf_counter() - t0

    targets = torch.LongTensor(list(spec.class_ids)).to(device)
    inputs = initial_images(spec, cfg, init, (shape.in_channels, shape.resolution, shape.resolution)).to(device)
    inputs.requires_grad_(True)
    iters = iterations or cfg.iterations
    optimizer = torch.optim.Adam([inputs], lr=cfg.lr, betas=[0.5, 0.9], eps=1e-8)
    criterion = nn.CrossEntropyLoss()
    views = generator(spec.seed, "augment")
    size = [shape.resolution, shape.resolution]
    lows = [-m / s for m, s in zip(mean, std)]
    highs = [(1 - m) / s for m, s in zip(mean, std)]
    best_cost, loss = 1e4, None
    t1 = time.perf_counter()
    for iteration in range(iters):
        lr = 0.5 * (1 + np.cos(np.pi * iteration / iters)) * cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        v = draw_view(views, shape.resolution, shape.resolution, cfg.crop_scale, cfg.jitter)
        inputs_jit = TF.resized_crop(inputs, v.top, v.left, v.height, v.width, size, antialias=True)
        if v.flip:
            inputs_jit = TF.hflip(inputs_jit)
        inputs_jit = torch.roll(inputs_jit, shifts=(v.roll_y, v.roll_x), dims=(2, 3))
        optimizer.zero_grad()
        outputs = model_teacher(inputs_jit)
        for model in (model_teacher_2, *others):
            model(inputs_jit)
        loss_ce = criterion(outputs, targets)
        loss_aux = 0.0
        for layer_hooks in hooks:
            rescale = [cfg.first_bn_multiplier] + [1.0] * (len(layer_hooks) - 1)
            loss_aux = loss_aux + cfg.r_bn * sum([h.r_feature * rescale[i] for i, h in enumerate(layer_hooks)])
        _, loss_var_l2 = image_prior_losses(inputs_jit)
        loss_l2 = inputs_jit.reshape(inputs_jit.size(0), -1).norm(2, 1).mean()  # noqa: F841 - computed, unused
        loss = loss_ce + loss_aux / len(hooks)
        if iteration % SAVE_EVERY == 0:
            _ = (loss.item(), sum(h.r_feature for h in hooks[0]).item(), criterion(outputs, targets).item())
            if verifier is not None:
                with torch.no_grad():
                    verifier(inputs)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for c in range(inputs.shape[1]):
                inputs.data[:, c] = torch.clamp(inputs.data[:, c], lows[c], highs[c])
        if best_cost > loss.item() or iteration == 1:
            best_inputs = inputs.data.clone()  # noqa: F841 - the reference keeps it, then saves the last images
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_steps = time.perf_counter() - t1

    t2 = time.perf_counter()
    images = inputs.data.clone()
    pixels = torch.stack([torch.clamp(images[:, c] * s + m, 0, 1) for c, (m, s) in enumerate(zip(mean, std))], 1)
    encoded = []
    for image in pixels:
        arr = (image.cpu().numpy().transpose((1, 2, 0)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(buf, format="JPEG")
        encoded.append(buf.getvalue())
    t_save = time.perf_counter() - t2
    for layer_hooks in hooks:
        for h in layer_hooks:
            h.close()
    return {"images": images.cpu(), "encoded": encoded, "iterations": iters, "loss": float(loss.item()),
            "seconds": {"load": t_load, "steps": t_steps, "save": t_save, "total": time.perf_counter() - t0}}


def save_weights(pool: dict[str, nn.Module], folder: str) -> dict[str, str]:
    """Each teacher's state_dict in its own file (what the reference reads per IPC index)."""
    paths = {}
    for name, model in pool.items():
        path = f"{folder}/{name}.pt"
        torch.save(model.state_dict(), path)
        paths[name] = path
    return paths

