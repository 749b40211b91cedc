"""Iterations per IPC index (flat and the reference's cyclic schedule) and the cosine learning rate."""
from __future__ import annotations

import pytest

from prism_ray.algo.schedule import cosine_lr, iterations_for


def test_cyclic_schedule_of_the_reference():
    got = [iterations_for(k, 4000, "cyclic", 500, 8) for k in range(18)]
    assert got == [4000, 3500, 3000, 2500, 2000, 1500, 1000, 500] * 2 + [4000, 3500]


def test_cyclic_schedule_other_values_and_flat():
    assert [iterations_for(k, 10, "cyclic", 3, 3) for k in range(6)] == [10, 7, 4, 10, 7, 4]
    assert [iterations_for(k, 1000, "flat") for k in range(9)] == [1000] * 9
    assert iterations_for(5, 1000, "cyclic", 0, 8) == 1000


def test_cyclic_schedule_refuses_non_positive_iterations():
    with pytest.raises(ValueError, match="ipc 2"):
        iterations_for(2, 100, "cyclic", 50, 8)
    with pytest.raises(ValueError, match="schedule"):
        iterations_for(0, 100, "linear")


def test_cosine_learning_rate():
    assert cosine_lr(0, 100, 0.05) == pytest.approx(0.05)
    assert cosine_lr(50, 100, 0.05) == pytest.approx(0.025)
    assert cosine_lr(25, 100, 0.05) == pytest.approx(0.05 * (1 + 2 ** -0.5) / 2)
    assert cosine_lr(100, 100, 0.05) == pytest.approx(0.0, abs=1e-12)
    lrs = [cosine_lr(t, 100, 1.0) for t in range(100)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
