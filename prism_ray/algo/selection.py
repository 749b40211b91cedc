"""Which teachers align BN statistics: the primary always, plus extras drawn from a pool.

Slot draw (the reference: 3 slots, each filled with probability 0.5): every slot is filled, with
probability `prob`, by a teacher drawn uniformly from the pool members not chosen yet, so no teacher is
drawn twice and an exhausted pool leaves later slots empty. Modes:
  pre    one draw per shard (the reference's "pre-distillation" selection);
  intra  a fresh draw every iteration;
  fixed  a given list, every iteration (an empty list gives the single-teacher SRe2L objective).
"""
from __future__ import annotations

from typing import Sequence

import torch

MODES = ("pre", "intra", "fixed")


def draw_slots(pool: Sequence[str], slots: int, prob: float, generator: torch.Generator) -> list[str]:
    """Extra teachers for one draw: each of `slots` slots filled with probability `prob`, no repeats."""
    remaining = list(pool)
    chosen: list[str] = []
    for _ in range(slots):
        filled = torch.rand((), generator=generator, dtype=torch.float64).item() < prob
        if filled and remaining:
            chosen.append(remaining.pop(int(torch.randint(len(remaining), (), generator=generator))))
    return chosen


class TeacherSelection:
    """The BN teachers of one shard, step by step; every random draw comes from `generator`."""

    def __init__(self, primary: str, mode: str, *, pool: Sequence[str] = (), slots: int = 0, prob: float = 0.0,
                 fixed: Sequence[str] = (), generator: torch.Generator | None = None):
        if mode not in MODES:
            raise ValueError(f"selection must be one of {', '.join(MODES)}, got {mode!r}")
        if mode in ("pre", "intra") and generator is None:
            raise ValueError(f"selection {mode!r} draws teachers and needs a generator")
        self.primary, self.mode = primary, mode
        self.slots, self.prob, self.generator = slots, prob, generator
        # The primary is a BN teacher already: drawing it again would count it twice.
        self.pool = [n for n in dict.fromkeys(pool) if n != primary]
        self._shard_extras: list[str] = []
        if mode == "pre":
            drawn = set(draw_slots(self.pool, slots, prob, generator))
            self._shard_extras = [n for n in self.pool if n in drawn]  # pool order: records read the same whatever order the slots drew
        elif mode == "fixed":
            self._shard_extras = [n for n in dict.fromkeys(fixed) if n != primary]

    def candidates(self) -> list[str]:
        """Every teacher this shard may use: the primary first."""
        extras = self.pool if self.mode == "intra" else self._shard_extras
        return [self.primary, *extras]

    def next_step(self) -> list[str]:
        """The BN teachers of the next iteration, primary first (a new draw in mode intra)."""
        if self.mode == "intra":
            return [self.primary, *draw_slots(self.pool, self.slots, self.prob, self.generator)]
        return [self.primary, *self._shard_extras]
