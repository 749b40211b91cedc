"""Iterations per IPC index and the per-step learning rate."""
from __future__ import annotations

import math


def iterations_for(ipc_index: int, base: int, schedule: str = "flat", cyclic_step: int = 500,
                   cyclic_period: int = 8) -> int:
    """Optimisation steps for IPC index k: `base`, or base - cyclic_step * (k % cyclic_period) when cyclic.

    The cyclic form (reference: 4000 - 500 * (k % 8)) spends fewer steps on some indices, so the set mixes
    images close to their real initialisation with heavily optimised ones.
    """
    if schedule == "flat":
        return base
    if schedule != "cyclic":
        raise ValueError(f"schedule must be 'flat' or 'cyclic', got {schedule!r}")
    n = base - cyclic_step * (ipc_index % cyclic_period)
    if n < 1:
        raise ValueError(f"cyclic schedule gives {n} iterations for ipc {ipc_index}: need iterations > "
                         f"cyclic_step * (cyclic_period - 1)")
    return n


def cosine_lr(step: int, total: int, base_lr: float) -> float:
    """Cosine decay without warm-up: base_lr at step 0, towards 0 at step `total`."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total)) * base_lr
