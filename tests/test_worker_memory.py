"""What `plan` says each worker kind needs at ImageNet shape: the parts the full-shape rehearsal found."""
from __future__ import annotations

import dataclasses

from prism_ray.config_loader import load_config
from prism_ray.memory import (ALLOCATOR_SLACK, CUDA_CONTEXT, LOADER_PREFETCH, PROCESS_BASE, GiB, label_bytes,
                              set_bytes, worker_memory)

IMAGENET = "jobs/configs/imagenet/resnet18.yaml"
AT_IPC50 = ["recover.ipc=50"]


def kinds(cfg) -> dict:
    return {w.kind: w for w in worker_memory(cfg, 1000)}


def test_label_shards_count_in_relabel_and_student_host_memory():
    cfg = load_config(IMAGENET, AT_IPC50)
    epoch, shard = label_bytes(cfg, 1000)
    assert epoch == 50_000 * (2 * 1000 + 26)  # fp16 logits and the plan's columns per image
    assert shard == 2 * epoch  # the config's 2 epochs per file
    ten = dataclasses.replace(cfg, relabel=dataclasses.replace(cfg.relabel, epochs_per_shard=10))
    # a relabel worker holds the file it builds and the one it uploads; a student worker the one it reads
    # (host bytes of tensors count ALLOCATOR_SLACK times: what a process holds per byte at its peak)
    assert abs(kinds(ten)["relabel"].host - kinds(cfg)["relabel"].host - ALLOCATOR_SLACK * 2 * 8 * epoch) <= 2
    assert abs(kinds(ten)["student"].host - kinds(cfg)["student"].host - ALLOCATOR_SLACK * 8 * epoch) <= 2
    assert kinds(cfg)["relabel"].host < 2 * GiB  # within the bound on top of the (GPU-held) set


def test_scoring_batches_count_where_they_run():
    cfg = load_config(IMAGENET, AT_IPC50)
    small = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, val_batch_size=100))
    big, little = kinds(cfg), kinds(small)
    # diversity runs the feature network on val_batch_size images: its activations are GPU memory on a GPU
    assert big["diversity"].gpu - little["diversity"].gpu > 400 * 2**20
    # ...while the real-image batches its DataLoader processes prefetch arrive in host memory
    prefetched = cfg.ray.cpus_per_worker * LOADER_PREFETCH * (500 - 100) * 3 * 224 * 224 * 4
    assert abs(big["diversity"].host - little["diversity"].host - ALLOCATOR_SLACK * prefetched) <= 2
    # on a CPU worker the same activations, and the set, are host memory
    cpu = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, gpus_per_worker=0))
    assert kinds(cpu)["diversity"].gpu == 0
    on_gpu = big["diversity"].gpu - CUDA_CONTEXT  # the set, a batch, the network's activations
    assert kinds(cpu)["diversity"].host >= PROCESS_BASE + ALLOCATOR_SLACK * on_gpu > PROCESS_BASE + set_bytes(cfg, 1000)
