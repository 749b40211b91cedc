"""Memory: what this process holds and may still take, and what each kind of worker will need.

The estimates come from the networks themselves (parameter counts and the sizes of their layers' outputs
for the configured batch and resolution, traced on the meta device: no memory, no compute) plus what each
worker holds by design (DESIGN.md section 8): one uint8 image set, streamed validation and diversity
batches, and the teachers it loads. On top of what those tensors take, a process holds what the allocator
keeps of freed memory (ALLOCATOR_SLACK) and its own code (PROCESS_BASE): both measured on real workers
(bench/worker_bounds.py, tests/test_worker_bounds.py), so that the figure is a bound. They are what `plan`
prints and what a stage checks against the connected cluster's nodes before it starts.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from prism_ray.algo.teachers import ModelShape, build_model
from prism_ray.config import STAGES, Config

GiB = 2 ** 30
PROCESS_BASE = int(1.25 * GiB)  # a Ray worker process with torch, torchvision, pyarrow and s3fs imported, its
# networks built: its peak RSS before any batch (bench/worker_bounds.py)
ALLOCATOR_SLACK = 1.2  # host memory a process holds per byte of tensors at its peak: what the allocator keeps
# of freed blocks, and the short-lived copies between the tensors counted here (bench/worker_bounds.py)
CUDA_CONTEXT = int(0.6 * GiB)  # the CUDA context and cuDNN/cuBLAS workspaces of one process
LOADER_PREFETCH = 2  # batches each DataLoader worker keeps ready (torch's default prefetch_factor)
# A recover step holds its teachers' layer outputs for backward, their gradients as backward goes, and the BN
# statistics' transient copies (centred squares, their gradients): 2.5 times the layers' outputs at the peak
# measured at ImageNet shape (bench/worker_bounds.py), where 2 times fell short.
RECOVER_ACTIVATIONS = 2.5


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (VmHWM), 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_freed_memory() -> None:
    """Give memory freed by Python and torch back to the system (glibc keeps freed heap pages otherwise), and
    empty torch's CUDA cache: what a worker does before it takes up another stage's work."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory (VmHWM) again from what it holds now (Linux: clear_refs 5), and
    torch's CUDA peak, so that a worker reused for another stage reports that stage's peaks; False where the
    host peak cannot be reset."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_memory_available() -> int:
    """Bytes this process could still take: MemAvailable, capped by a cgroup (v2 or v1) memory limit."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            room = int(limit) - usage
            available = room if available is None else min(available, room)
        break
    return available if available is not None else 0


@lru_cache(maxsize=None)
def network_bytes(arch: str, num_classes: int, channels: int, resolution: int, batch: int) -> tuple[int, int, int]:
    """(parameters and buffers, sum of all layer outputs, largest layer output) in fp32 bytes for one forward
    of `batch` images, traced on the meta device."""
    outputs: list[int] = []

    def record(module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            outputs.append(output.numel() * 4)

    with torch.device("meta"):
        model = build_model(arch, ModelShape(num_classes, channels, resolution)).eval()
        handles = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
        with torch.no_grad():
            model(torch.zeros(batch, channels, resolution, resolution))
        for h in handles:
            h.remove()
    params = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    return params, sum(outputs), max(outputs, default=0)


@dataclass
class WorkerMemory:
    """Peak bytes one worker of a stage needs: in host memory, and on its GPU (0 on a CPU worker)."""

    kind: str
    host: int
    gpu: int
    holds: str  # what dominates, for people

    def describe(self) -> str:
        from prism_ray.formatting import human_bytes
        gpu = f", GPU {human_bytes(self.gpu)}" if self.gpu else ""
        return f"{self.kind}: host {human_bytes(self.host)}{gpu} ({self.holds})"


def set_bytes(cfg: Config, num_classes: int) -> int:
    """A distilled set decoded as uint8 (N, C, H, W)."""
    d = cfg.data
    return num_classes * cfg.recover.ipc * d.channels * d.resolution * d.resolution


def _place(kind: str, cfg: Config, host_part: int, device_part: int, holds: str) -> WorkerMemory:
    """On a GPU worker the device part sits on the GPU (the CUDA context too); on a CPU worker, in host memory.
    Host tensors take ALLOCATOR_SLACK times their size in resident memory (GPU memory is counted as allocated:
    the caching allocator's reserve is the GPU reserve `image_sets` keeps)."""
    if cfg.ray.gpus_per_worker > 0:
        return WorkerMemory(kind, PROCESS_BASE + int(ALLOCATOR_SLACK * host_part), CUDA_CONTEXT + device_part, holds)
    return WorkerMemory(kind, PROCESS_BASE + int(ALLOCATOR_SLACK * (host_part + device_part)), 0, holds)


def worker_memory(cfg: Config, num_classes: int, stages: list[str] | None = None) -> list[WorkerMemory]:
    """Each worker kind that `stages` (default: run.stages) start, with its peak memory."""
    d = cfg.data
    shape = (num_classes, d.channels, d.resolution)
    out = []
    stages = set(cfg.run.stages if stages is None else stages)
    if "squeeze" in stages and any(t.weights == "squeeze" for t in cfg.teachers.models):
        from prism_ray.stages.squeeze import IN_MEMORY_LIMIT
        train_images = num_classes * (d.max_per_class or 1300)
        data = train_images * d.channels * d.resolution ** 2 * 4 if train_images <= IN_MEMORY_LIMIT else 0
        need = max(_train_bytes(t.arch, shape, cfg.squeeze.batch_size, 1.0) for t in cfg.teachers.models
                   if t.weights == "squeeze")
        out.append(_place("squeeze", cfg, data, need, "training set in memory as float32" if data else
                          "the teacher in training"))
    if "recover" in stages:
        need = 0
        for rc in cfg.recover_methods().values():
            names = list(dict.fromkeys([rc.primary, *rc.bn_pool, *rc.fixed]))
            params = sum(network_bytes(cfg.teacher(n).arch, *shape, 1)[0] for n in names)
            drawn = names[:1 + (len(names) - 1 if rc.selection == "intra" else min(rc.slots, len(names) - 1))]
            if rc.selection == "fixed":
                drawn = list(dict.fromkeys([rc.primary, *rc.fixed]))
            acts = sum(network_bytes(cfg.teacher(n).arch, *shape, rc.class_group)[1] for n in drawn)
            amp = 0.5 if rc.precision == "bf16" else 1.0  # bf16 activations
            # the batch being optimized: pixels, their gradient and Adam's two moments (fp32, whatever the
            # precision), and the step's augmented view with its crop, flip and roll copies
            batch = rc.class_group * d.channels * d.resolution ** 2 * 4
            need = max(need, params + int(RECOVER_ACTIVATIONS * acts * amp) + (4 + 4) * batch)
        out.append(_place("recover", cfg, 0, need, f"teacher pool and a {cfg.recover.class_group}-image batch's "
                                                  f"activations with gradients"))
    sets = set_bytes(cfg, num_classes)
    label_teachers = [cfg.teacher(n).arch for n in cfg.relabel_teachers()]
    epoch_labels, shard_labels = label_bytes(cfg, num_classes)
    if "relabel" in stages and cfg.relabel.mode == "stored":
        # a shard's file being built while the previous one uploads, and one epoch's labels as tensor and table
        out.append(_place("relabel", cfg, 2 * shard_labels + 2 * epoch_labels,
                          sets + _inference_bytes(label_teachers, shape, cfg.relabel.mix_group),
                          "one uint8 set, the label teachers, label shards being written"))
    if "evaluate" in stages:
        e = cfg.evaluate
        live = _inference_bytes(label_teachers, shape, e.batch_size) if cfg.relabel.mode == "live" else 0
        # training and scoring take turns: the larger of the two is the peak. A micro-batch's activations are
        # held at a time (evaluate.accumulation_steps); bf16 autocast halves them; scoring runs fp32
        student_amp = 0.5 if e.precision == "bf16" else 1.0
        micro = -(-e.batch_size // e.accumulation_steps)
        student = max(max(_train_bytes(a, shape, micro, student_amp, optimizer_states=2),
                          _inference_bytes([a], shape, e.val_batch_size)) for a in e.students)
        loader = max(1, int(cfg.ray.cpus_per_worker)) * LOADER_PREFETCH * e.val_batch_size * d.channels * \
            d.resolution ** 2 * 4
        # a stored shard's file, one epoch decoded from it, and that epoch's labels as float32 for the loss
        dense = num_classes * cfg.recover.ipc * num_classes * 4
        labels = shard_labels + epoch_labels + dense if cfg.relabel.mode == "stored" else dense
        out.append(_place("student", cfg, loader + labels, sets + student + live,
                          "one uint8 set, the student in training, validation batches, one epoch's labels"))
        net = cfg.teacher(cfg.evaluate.diversity_network or cfg.recover.primary).arch
        batch = e.val_batch_size * d.channels * d.resolution ** 2 * 4  # the float batch fed to the network
        # the real images it compares with are streamed like validation batches: the same loader prefetch
        out.append(_place("diversity", cfg, loader, sets + batch + _inference_bytes([net], shape, e.val_batch_size),
                          f"one uint8 set, the feature network on batches of {e.val_batch_size}, streamed "
                          f"real-image batches"))
    return out


def label_row_bytes(cfg: Config, num_classes: int) -> int:
    """Bytes of one stored label row (prism_ray.stages.relabel's format), uncompressed: fp16 logits (or top-k
    values and class indices) and the plan's columns."""
    k = cfg.relabel.topk or num_classes
    index_bytes = 2 if num_classes < 2 ** 15 else 4
    return 2 * k + (index_bytes * k if cfg.relabel.topk else 0) + 26


def label_bytes(cfg: Config, num_classes: int) -> tuple[int, int]:
    """(one epoch, one shard) of stored soft labels for a set, uncompressed: fp16 logits (or top-k values and
    indices) plus the plan's columns per image."""
    epoch = num_classes * cfg.recover.ipc * label_row_bytes(cfg, num_classes)
    return epoch, epoch * min(cfg.relabel.epochs_per_shard, cfg.relabel_epochs())


def for_stage(cfg: Config, num_classes: int, worker_kind: str | None) -> WorkerMemory | None:
    """The estimate for a stage's workers (`Stage.worker_kind`), or None for light ones."""
    if worker_kind is None:
        return None
    return next((w for w in worker_memory(cfg, num_classes, list(STAGES)) if w.kind == worker_kind), None)


def _train_bytes(arch: str, shape: tuple, batch: int, amp: float, optimizer_states: int = 1) -> int:
    params, acts, _ = network_bytes(arch, *shape, batch)
    return params * (2 + optimizer_states) + int(2 * acts * amp)  # weights, gradients, optimizer state


def _inference_bytes(archs: list[str], shape: tuple, batch: int) -> int:
    parts = [network_bytes(a, *shape, batch) for a in archs]
    return sum(p for p, _, _ in parts) + 3 * max((m for _, _, m in parts), default=0)
