"""The collapse guard's statistics on hand-derived tensors, and its state: it trips after exactly `patience`
out-of-bounds validations in a row, never on a healthy digits run."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.data import DigitsDataset
from trainer.guard import (
    GridStats,
    Guard,
    Thresholds,
    Trip,
    channel_means,
    diversity,
    grid_stats,
    mean_drift,
    saturation,
)


def test_saturation_counts_values_at_or_beyond_the_ends() -> None:
    # 8 values: -1, +1, 1.5 (beyond, clipped when saved), 0.99 (within the 0.02 margin) count; 0, 0.5, -0.97 and
    # 0.2 do not: 4 of 8.
    x = torch.tensor([-1.0, 1.0, 1.5, 0.99, 0.0, 0.5, -0.97, 0.2]).reshape(2, 1, 2, 2)
    assert saturation(x) == 0.5
    assert saturation(x, margin=0.0) == 3 / 8
    assert saturation(torch.zeros(3, 3, 4, 4)) == 0.0
    with pytest.raises(ValueError, match=r"images: expected a tensor \[N, C, H, W\]"):
        saturation(torch.zeros(3, 4, 4))


def test_channel_means_and_drift() -> None:
    x = torch.zeros(2, 3, 2, 2)
    x[:, 0] = 1.0  # red +1 everywhere
    x[0, 1] = -1.0  # green -1 in image 0, 0 in image 1: mean -0.5
    means = channel_means(x)
    assert means == (1.0, -0.5, 0.0)
    assert mean_drift(means, (0.5, -0.5, 0.25)) == 0.5  # the largest change: red, 1.0 - 0.5
    with pytest.raises(ValueError, match="means: 3 channels"):
        mean_drift(means, (0.0,))


def test_diversity_is_the_mean_pairwise_distance() -> None:
    # Three points on a line at 0, 3 and 4 (as [3, 1, 1, 1] features): pairs 3, 4 and 1, mean 8/3.
    f = torch.tensor([0.0, 3.0, 4.0]).reshape(3, 1, 1, 1)
    assert math.isclose(diversity(f), 8 / 3, rel_tol=1e-6)
    # A 3-4-5 triangle in 2-D: distances 3, 4, 5, mean 4.
    assert math.isclose(diversity(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])), 4.0, rel_tol=1e-6)
    assert diversity(torch.ones(5, 4, 2, 2)) == 0.0  # identical images
    with pytest.raises(ValueError, match="features: expected"):
        diversity(torch.ones(1, 4))


def _stats(sat: float = 0.3, means: tuple[float, ...] = (-0.37,) * 3, div: float = 16.0) -> GridStats:
    return GridStats(sat, means, div)


def test_a_collapse_trips_after_exactly_patience_validations() -> None:
    guard = Guard(patience=3)
    assert guard.update(_stats(means=(0.0, 0.0, 0.0))) == []  # the reference
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1  # +-1: blown out, mean 0
    saturated = grid_stats(checker.expand(10, 3, 16, 16), torch.randn(10, 4, 2, 2))  # features still diverse
    assert saturated.saturation == 1.0 and saturated.channel_means == (0.0, 0.0, 0.0)
    assert guard.update(saturated) == [] and guard.update(saturated) == []
    assert guard.update(saturated) == [Trip("saturation", 1.0, 0.75, 3)]
    assert str(guard.update(saturated)[0]).startswith("collapse guard: saturation 1.000 has been above 0.75 for 4")

    # A recovery resets the streak: patience counts validations *in a row*.
    guard = Guard(patience=2)
    guard.update(_stats())
    same = _stats(div=0.0)  # identical images
    assert guard.update(same) == []
    assert guard.update(_stats()) == []
    assert guard.update(same) == []
    trips = guard.update(same)
    assert [(t.stat, t.value, t.validations) for t in trips] == [("diversity", 0.0, 2)]
    assert str(trips[0]).startswith("collapse guard: diversity 0.000 has been below 0.25")


def test_identical_images_from_real_tensors_trip_diversity_and_drift() -> None:
    guard = Guard(patience=2)
    start = torch.rand(10, 3, 8, 8) * 2 - 1
    guard.update(grid_stats(start, start))
    black = -torch.ones(10, 3, 8, 8)  # every image the same black square: mean -1, no diversity, saturated
    first = guard.update(grid_stats(black, black))
    assert first == []
    tripped = {t.stat for t in guard.update(grid_stats(black, black))}
    assert tripped == {"saturation", "drift", "diversity"}


def test_a_healthy_digits_run_never_trips() -> None:
    """Twenty validations of random 10-image grids of real digits (what a good student's grid looks like), with
    the pixels as features: nothing trips with the defaults, even at patience 1."""
    images = DigitsDataset(16).images
    gen = torch.Generator().manual_seed(0)
    guard = Guard(patience=1)
    for _ in range(20):
        grid = images[torch.randperm(len(images), generator=gen)[:10]]
        assert guard.update(grid_stats(grid, grid)) == []


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="patience: must be >= 1"):
        Guard(patience=0)
    with pytest.raises(ValueError, match="max_saturation: 1.5 is out of range"):
        Thresholds(max_saturation=1.5)
    with pytest.raises(ValueError, match="features: 3 rows for 2 images"):
        grid_stats(torch.zeros(2, 3, 4, 4), torch.zeros(3, 4))
