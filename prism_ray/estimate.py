"""The bill of a run: GPU-hours per stage from FLOP counts, a GPU's peak and an efficiency.

FLOPs come from torch.utils.flop_counter.FlopCounterMode on the meta device (no memory, no compute), once
per architecture and input size, for what each stage does with a network:

    recover    forward + backward to the input (frozen teacher), per image per step, for the primary and
               each extra BN teacher weighted by how often it is drawn (a BN-free teacher is never run)
    relabel    forward, per image per epoch, for each soft-label teacher
    evaluate   forward + full backward of each student, per image per epoch (plus the teachers' forward in
               live relabel mode); squeeze likewise for each teacher it trains

FlopCounterMode counts matrix and convolution FLOPs (2 per multiply-add); BN statistics, activations and
the optimizer are memory-bound extras that the efficiency absorbs. Time = FLOPs / (peak x efficiency),
where the efficiency is the fraction of the GPU's dense bf16 peak a stage achieves: measured, from a
bench JSON written on that GPU (bench/gpu_recover.py), or assumed (ASSUMED_EFFICIENCY), and the bill
says which. A stage that runs in fp32 (recover.precision, evaluate.precision; relabel and squeeze always)
gets FP32_PEAK_FRACTION of that peak.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
from math import comb
from dataclasses import dataclass, field
from typing import Optional

import torch

from prism_ray.algo.schedule import iterations_for
from prism_ray.config import Config, ConfigError, RecoverConfig

# Dense bf16 tensor-core peaks (TFLOP/s, fp32 accumulate, no sparsity), from the vendors' datasheets.
GPU_PEAK_TFLOPS = {
    "H100": 989.0,      # SXM5
    "H200": 989.0,      # SXM: the H100's arithmetic with more memory
    "A100": 312.0,
    "A10G": 70.0,       # AWS publishes no figure; ~70 is the commonly quoted dense rate (A10: 125)
    "L4": 121.0,
    "RTX 4090": 165.2,  # Ada whitepaper, bf16 with fp32 accumulate
}

# Fraction of the bf16 peak a stage is assumed to reach when no bench JSON from that GPU exists. Set from
# published training throughputs (torchvision ResNets under AMP reach ~10-15% of an A100's bf16 peak);
# recover is put lower for its memory-bound BN statistics and depthwise teachers, relabel (inference only)
# higher. A measurement on the GPU replaces these.
ASSUMED_EFFICIENCY = {"squeeze": 0.12, "recover": 0.08, "relabel": 0.15, "evaluate": 0.12}

# A stage in fp32 runs its convolutions as TF32 on tensor cores (cuDNN's default in PyTorch), whose dense peak
# is half the bf16 one on every GPU above (A100 156 vs 312, H100 SXM 494 vs 989, L4 60 vs 121 TFLOP/s).
FP32_PEAK_FRACTION = 0.5


def gpu_peak(name: str) -> tuple[str, float]:
    """(canonical name, dense bf16 TFLOP/s) for a GPU name, case and space insensitive."""
    key = name.replace(" ", "").replace("-", "").upper()
    for known, peak in GPU_PEAK_TFLOPS.items():
        if known.replace(" ", "").upper() == key:
            return known, peak
    raise ConfigError("--gpu", f"unknown GPU {name!r}; allowed: {', '.join(GPU_PEAK_TFLOPS)}")


@functools.lru_cache(maxsize=None)
def network_flops(arch: str, resolution: int, num_classes: int, in_channels: int = 3) -> dict[str, float]:
    """FLOPs per image of `arch` at `resolution`: 'forward', 'backward_input' (frozen weights, gradient to the
    input: recover) and 'backward' (all gradients of a network in training: students, squeeze).

    'backward' is backward_input + forward: a convolution's or matrix product's weight gradient costs
    exactly its forward FLOPs, and FlopCounterMode overcounts the weight gradient of grouped (depthwise)
    convolutions by the group count (MobileNetV2 would bill 19x its forward pass).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from prism_ray.algo.teachers import ModelShape, build_model, freeze

    batch = 2  # batch 1 can take special paths; everything counted is linear in the batch
    with torch.device("meta"):
        model = freeze(build_model(arch, ModelShape(num_classes, in_channels, resolution)))
    x = torch.empty(batch, in_channels, resolution, resolution, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        out = model(x)
    forward = fc.get_total_flops() / batch
    with FlopCounterMode(display=False) as fc:
        out.float().sum().backward()
    backward_input = fc.get_total_flops() / batch
    return {"forward": forward, "backward_input": backward_input, "backward": backward_input + forward}


def expected_extra_teachers(rc: RecoverConfig) -> float:
    """Mean number of extra BN teachers per step: slots filled with slot_prob, capped by the pool (no repeats)."""
    if rc.selection == "fixed":
        return float(len([n for n in rc.fixed if n != rc.primary]))
    pool = len([n for n in rc.bn_pool if n != rc.primary])
    n, p = rc.slots, rc.slot_prob
    return sum(comb(n, k) * p ** k * (1 - p) ** (n - k) * min(k, pool) for k in range(n + 1))


def extra_teacher_weights(rc: RecoverConfig) -> dict[str, float]:
    """How often each extra BN teacher runs, per step: its probability of being drawn."""
    if rc.selection == "fixed":
        return {n: 1.0 for n in dict.fromkeys(rc.fixed) if n != rc.primary}
    pool = [n for n in dict.fromkeys(rc.bn_pool) if n != rc.primary]
    if not pool:
        return {}
    each = expected_extra_teachers(rc) / len(pool)  # slots draw uniformly: members are exchangeable
    return {n: each for n in pool}


@dataclass
class StageBill:
    """One stage's compute: FLOPs, how they are split into units, and the time they take on a GPU."""

    stage: str
    kind: str  # squeeze / recover / relabel / evaluate: which efficiency applies
    flops: float
    units: int
    largest_unit_flops: float
    detail: str
    gpu_hours: float = 0.0
    efficiency: float = 0.0
    source: str = ""
    precision: str = "fp32"  # bf16: the bf16 peak; fp32: FP32_PEAK_FRACTION of it (TF32 convolutions)

    def wall_hours(self, gpus: int) -> float:
        """Wall time on `gpus` GPUs: the units spread evenly, but never shorter than the largest unit."""
        if not self.flops:
            return 0.0
        per_flop = self.gpu_hours / self.flops
        return max(self.gpu_hours / gpus, self.largest_unit_flops * per_flop,
                   math.ceil(self.units / gpus) * (self.flops / self.units) * per_flop if self.units else 0.0)


@dataclass
class Bill:
    gpu: str
    peak_tflops: float
    stages: list[StageBill] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)


def _arch(cfg: Config, teacher: str) -> str:
    return cfg.teacher(teacher).arch


def _has_bn(arch: str, cfg: Config, num_classes: int) -> bool:
    from prism_ray.algo.teachers import ModelShape, build_model, has_batchnorm
    with torch.device("meta"):
        return has_batchnorm(build_model(arch, ModelShape(num_classes, cfg.data.channels, cfg.data.resolution)))


def recover_bill(cfg: Config, name: str, rc: RecoverConfig, num_classes: int) -> StageBill:
    res, ch = cfg.data.resolution, cfg.data.channels
    flops_of = lambda teacher: network_flops(_arch(cfg, teacher), res, num_classes, ch)  # noqa: E731
    p = flops_of(rc.primary)
    per_image_step = p["forward"] + p["backward_input"]
    for teacher, weight in extra_teacher_weights(rc).items():
        if _has_bn(_arch(cfg, teacher), cfg, num_classes):  # BN-free teachers are never run
            f = flops_of(teacher)
            per_image_step += weight * (f["forward"] + f["backward_input"])
    groups = [min(rc.class_group, num_classes - s) for s in range(0, num_classes, rc.class_group)]
    image_steps, largest = 0, 0
    for k in range(rc.ipc):
        its = iterations_for(k, rc.iterations, rc.schedule, rc.cyclic_step, rc.cyclic_period)
        image_steps += its * sum(groups)
        largest = max(largest, its * max(groups))
    return StageBill(f"recover/{name}", "recover", image_steps * per_image_step, rc.ipc * len(groups),
                     largest * per_image_step,
                     f"{image_steps:,} image-steps x {per_image_step / 1e9:.2f} GFLOP", precision=rc.precision)


def bill(cfg: Config, num_classes: int, gpu: str = "H200", efficiency: Optional[float] = None,
         bench_files: Optional[list[str]] = None) -> Bill:
    """The bill of `cfg` on `gpu`: per stage, FLOPs and GPU-hours (see the module docstring)."""
    name, peak = gpu_peak(gpu)
    if efficiency is not None and not 0 < efficiency <= 1:
        raise ConfigError("--efficiency", f"got {efficiency}; allowed: a fraction of the peak in (0, 1]")
    out = Bill(name, peak)
    res, ch = cfg.data.resolution, cfg.data.channels
    stages = cfg.run.stages
    if "squeeze" in stages:
        trained = [t for t in cfg.teachers.models if t.weights == "squeeze"]
        if trained and cfg.data.max_per_class:
            n_train = cfg.data.max_per_class * num_classes
            total = 0.0
            for t in trained:
                f = network_flops(t.arch, res, num_classes, ch)
                total += cfg.squeeze.epochs * n_train * (f["forward"] + f["backward"])
            out.stages.append(StageBill("squeeze", "squeeze", total, len(trained), total / len(trained),
                                        f"{len(trained)} teachers x {cfg.squeeze.epochs:g} epochs of {n_train:,}"))
        elif trained:
            out.notes.append("squeeze not billed: the training set's size is unknown without data.max_per_class")
    n_images = num_classes * cfg.recover.ipc
    sets = cfg.sets()
    if "recover" in stages:
        for set_name, rc in cfg.recover_methods().items():
            out.stages.append(recover_bill(cfg, set_name, rc, num_classes))
    epochs = cfg.relabel_epochs()
    label_flops = sum(network_flops(_arch(cfg, t), res, num_classes, ch)["forward"] for t in cfg.relabel_teachers())
    if "relabel" in stages and cfg.relabel.mode == "stored":
        total = len(sets) * epochs * n_images * label_flops
        units = len(sets) * -(-epochs // cfg.relabel.epochs_per_shard)
        out.stages.append(StageBill("relabel", "relabel", total, units, total / units,
                                    f"{len(sets)} sets x {epochs} epochs x {n_images:,} images x "
                                    f"{label_flops / 1e9:.2f} GFLOP"))
    if "evaluate" in stages:
        e = cfg.evaluate
        per_run = 0.0
        for arch in e.students:
            f = network_flops(arch, res, num_classes, ch)
            per_run += e.epochs * n_images * (f["forward"] + f["backward"])
        live = cfg.relabel.mode == "live"
        if live:
            per_run += len(e.students) * e.epochs * n_images * label_flops
        runs = len(sets) * len(e.seeds)
        total = runs * per_run
        out.stages.append(StageBill("evaluate", "evaluate", total, runs * len(e.students),
                                    per_run / len(e.students),
                                    f"{runs * len(e.students)} student trainings x {e.epochs} epochs x "
                                    f"{n_images:,} images" + (" (+ live teacher forwards)" if live else ""),
                                    precision=e.precision))
        out.notes.append("evaluate: validation and diversity passes are not billed (a few forward passes)")
    measured = load_bench(name, bench_files)
    for s in out.stages:
        if efficiency is not None:
            s.efficiency, s.source = efficiency, "given (--efficiency)"
        elif s.kind in measured:
            s.efficiency, s.source = measured[s.kind]
        else:
            s.efficiency, s.source = ASSUMED_EFFICIENCY[s.kind], "assumed"
        rate = peak * (1.0 if s.precision == "bf16" else FP32_PEAK_FRACTION)
        s.gpu_hours = s.flops / (rate * 1e12 * s.efficiency) / 3600.0
    return out


def load_bench(gpu: str, files: Optional[list[str]] = None) -> dict[str, tuple[float, str]]:
    """Measured efficiencies by stage kind from bench JSONs written on `gpu` (default: bench/results/*.json
    under the current folder): {'recover': (fraction of peak, 'measured: FILE')}."""
    paths = files if files is not None else sorted(glob.glob(os.path.join("bench", "results", "*.json")))
    found: dict[str, tuple[float, str]] = {}
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or not data.get("gpu"):
            continue
        try:
            if gpu_peak(str(data["gpu"]))[0] != gpu:
                continue
        except ConfigError:  # a GPU without a known peak cannot give a fraction of it
            continue
        for kind, value in (data.get("efficiency") or {}).items():
            if kind in ASSUMED_EFFICIENCY and isinstance(value, (int, float)) and value > 0:
                found[kind] = (float(value), f"measured ({path})")
    return found


def bill_lines(b: Bill, gpus: Optional[int] = None) -> list[str]:
    """The bill as lines of `prism-ray plan`."""
    if gpus is not None and gpus < 1:
        raise ConfigError("--gpus", f"got {gpus}; allowed: 1 or more")
    lines = [f"GPU-hours on {b.gpu} (dense bf16 peak {b.peak_tflops:g} TFLOP/s), from FLOP counts at the "
             f"config's resolution:"]
    for s in b.stages:
        wall = f", {_hours(s.wall_hours(gpus))} wall on {gpus} GPUs" if gpus else ""
        rate = "" if s.precision == "bf16" else f" x {FP32_PEAK_FRACTION:g} (fp32: TF32 convolutions)"
        lines.append(f"  {s.stage}: {_flops(s.flops)} ({s.detail}) at {s.efficiency:.0%} of peak{rate} "
                     f"[{s.source}] = {_gpu_time(s.gpu_hours)}{wall}")
    total = f"  total: {_gpu_time(b.gpu_hours)}"
    if gpus:
        total += f", {_hours(sum(s.wall_hours(gpus) for s in b.stages))} wall on {gpus} GPUs (stages run one " \
                 f"after another; units spread evenly, never shorter than the largest unit)"
    lines.append(total)
    lines.extend(f"  note: {n}" for n in b.notes)
    return lines


def _hours(h: float) -> str:
    if h >= 1:
        return f"{h:.2f} h"
    return f"{h * 60:.1f} min" if h * 60 >= 1 else f"{h * 3600:.1f} s"


def _gpu_time(h: float) -> str:
    if h >= 0.1:
        return f"{h:,.2f} GPU-hours"
    return f"{h * 60:.1f} GPU-minutes" if h * 60 >= 1 else f"{h * 3600:.1f} GPU-seconds"


def _flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x / 1e9:,.1f} GFLOP"
