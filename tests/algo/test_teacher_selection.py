"""The slot draw of extra BN teachers and the pre / intra / fixed selection modes."""
from __future__ import annotations

from collections import Counter
from math import comb

import pytest
import torch

from prism_ray.algo.selection import TeacherSelection, draw_slots

REFERENCE_POOL = ["mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "alexnet"]


def binomial(n: int, p: float) -> list[float]:
    return [comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]


@pytest.mark.parametrize("pool,slots,prob", [(REFERENCE_POOL, 3, 0.5), (["a", "b", "c", "d", "e"], 2, 0.2)])
def test_slot_draw_frequencies(pool, slots, prob):
    g = torch.Generator().manual_seed(1234)
    n = 4000
    sizes, members = Counter(), Counter()
    for _ in range(n):
        drawn = draw_slots(pool, slots, prob, g)
        assert len(drawn) == len(set(drawn)), "a teacher was drawn twice"
        assert set(drawn) <= set(pool)
        sizes[len(drawn)] += 1
        members.update(drawn)
    # each slot filled independently: the number drawn is Binomial(slots, prob) while the pool lasts
    for k, p in enumerate(binomial(slots, prob)):
        assert sizes[k] / n == pytest.approx(p, abs=0.03), (k, sizes)
    # and every pool member is equally likely: slots * prob / |pool| each
    for name in pool:
        assert members[name] / n == pytest.approx(slots * prob / len(pool), abs=0.03), (name, members)


def test_slot_draw_stops_when_the_pool_is_exhausted():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sorted(draw_slots(["a", "b"], 3, 1.0, g)) == ["a", "b"]
    assert draw_slots(["a", "b"], 3, 0.0, g) == []
    assert draw_slots([], 3, 1.0, g) == []


def test_slot_draw_is_determined_by_the_generator():
    draws = [[draw_slots(REFERENCE_POOL, 3, 0.5, g) for _ in range(30)]
             for g in (torch.Generator().manual_seed(9), torch.Generator().manual_seed(9))]
    assert draws[0] == draws[1]
    other = [draw_slots(REFERENCE_POOL, 3, 0.5, torch.Generator().manual_seed(10)) for _ in range(30)]
    assert other != draws[0]


def test_pre_draws_once_per_shard_and_keeps_the_primary_first():
    sets = set()
    for seed in range(40):
        sel = TeacherSelection("resnet18", "pre", pool=REFERENCE_POOL, slots=3, prob=0.5,
                               generator=torch.Generator().manual_seed(seed))
        first = sel.next_step()
        assert first[0] == "resnet18"
        assert all(sel.next_step() == first for _ in range(10))
        assert sel.candidates() == first
        sets.add(tuple(sorted(first[1:])))
    assert len(sets) > 5  # different shards draw different subsets


def test_intra_draws_every_step_from_the_pool():
    sel = TeacherSelection("resnet18", "intra", pool=REFERENCE_POOL, slots=3, prob=0.5,
                           generator=torch.Generator().manual_seed(3))
    assert sel.candidates() == ["resnet18", *REFERENCE_POOL]
    steps = [sel.next_step() for _ in range(200)]
    assert all(s[0] == "resnet18" and set(s[1:]) <= set(REFERENCE_POOL) for s in steps)
    assert len({tuple(s) for s in steps}) > 10
    mean_extra = sum(len(s) - 1 for s in steps) / len(steps)
    assert mean_extra == pytest.approx(1.5, abs=0.25)


def test_fixed_and_the_primary_in_its_own_pool():
    sel = TeacherSelection("p", "fixed", fixed=["a", "p", "b", "a"])
    assert sel.next_step() == ["p", "a", "b"]
    assert TeacherSelection("p", "fixed", fixed=[]).next_step() == ["p"]  # SRe2L: one teacher
    sel = TeacherSelection("p", "pre", pool=["p", "a"], slots=3, prob=1.0, generator=torch.Generator())
    assert sel.next_step() == ["p", "a"]  # the primary is never drawn a second time


def test_bad_mode_or_missing_generator():
    with pytest.raises(ValueError, match="selection"):
        TeacherSelection("p", "post")
    with pytest.raises(ValueError, match="generator"):
        TeacherSelection("p", "intra", pool=["a"], slots=1, prob=1.0)
