"""Collapse guard, the pure part: statistics of a validation grid and a small state object that says when one of
them has been out of bounds for `patience` validations in a row.

A distillation run can collapse without a non-finite loss: the student's images blow out to the value range's
ends, drift to one colour, or all become the same image (mode collapse). These three statistics catch each, and
need only the validation grid the loop already renders plus per-image features (the caller passes the VAE latents
it decoded the grid from, so no extra network runs):

- saturation: the fraction of pixel values at the ends of the range (blown-out or clipped images);
- drift: how far the per-channel means have moved from the first validation's (a colour cast, a grey-out);
- diversity: the mean pairwise distance of the images' feature vectors, relative to the first validation's
  (1.0 = as diverse as at the start; identical images give 0).

Images are tensors [N, C, H, W] in [-1, 1], what the teacher's VAE decodes to and the validation grids hold
(trainer/models.py Teacher.decode); values outside are counted as saturated, as they are clipped when saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor


class GuardSpecLike(Protocol):  # trainer.jobspec.GuardSpec; guard.py stays free of the spec package
    max_saturation: float
    max_drift: float
    min_diversity: float
    patience: int


# A value within this of -1 or +1 counts as saturated: 8-bit PNGs quantise [-1, 1] in steps of 2/255 ~ 0.008,
# so 0.02 is the 2-3 levels at each end, what a blown-out pixel becomes once saved.
SATURATION_MARGIN = 0.02


def _check_images(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images: expected a tensor [N, C, H, W] with N >= 1, got shape {tuple(images.shape)}")


def saturation(images: Tensor, margin: float = SATURATION_MARGIN) -> float:
    """The fraction of values within `margin` of -1 or +1, or beyond (0 = none, 1 = every value)."""
    _check_images(images)
    return float((images.detach().float().abs() >= 1.0 - margin).float().mean())


def channel_means(images: Tensor) -> tuple[float, ...]:
    """The mean of each channel over the whole grid, in the images' [-1, 1] units."""
    _check_images(images)
    return tuple(float(m) for m in images.detach().float().mean(dim=(0, 2, 3)))


def mean_drift(means: tuple[float, ...], reference: tuple[float, ...]) -> float:
    """The largest per-channel change of the mean from `reference` (the first grid's), in [-1, 1] units."""
    if len(means) != len(reference):
        raise ValueError(f"means: {len(means)} channels, but the reference has {len(reference)}")
    return max(abs(a - b) for a, b in zip(means, reference, strict=True))


def diversity(features: Tensor) -> float:
    """The mean Euclidean distance between the feature vectors of every pair of images (features [N, ...],
    flattened per image; N >= 2). Identical images give 0."""
    if features.ndim < 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected [N, ...] with N >= 2 images, got shape {tuple(features.shape)}")
    flat = features.detach().float().reshape(features.shape[0], -1)
    dist = torch.cdist(flat, flat)  # [N, N], zero diagonal
    n = flat.shape[0]
    return float(dist.sum() / (n * (n - 1)))  # each unordered pair counted twice, the diagonal not at all


@dataclass(frozen=True)
class GridStats:
    """One validation's statistics (the absolute ones; drift and relative diversity need the first grid)."""

    saturation: float
    channel_means: tuple[float, ...]
    diversity: float


def grid_stats(images: Tensor, features: Tensor) -> GridStats:
    """The statistics of one validation grid: `images` [N, C, H, W] in [-1, 1], `features` [N, ...] per image."""
    if features.shape[0] != images.shape[0]:
        raise ValueError(f"features: {features.shape[0]} rows for {images.shape[0]} images")
    return GridStats(saturation(images), channel_means(images), diversity(features))


@dataclass(frozen=True)
class Thresholds:
    """When a statistic counts as out of bounds. The defaults leave a healthy digits run far inside; measured on
    10-image grids of the real 16 px digits (tests/unit/test_guard.py replays them) and the shipped teacher's grid:

    - max_saturation 0.75: real digits are mostly black background at exactly -1, so a healthy grid is already
      ~0.29 saturated (the teacher's 0.23); 0.75 is 2.5 times that: the strokes and their edges have blown out too.
    - max_drift 0.3: the grids' channel mean is about -0.37 (real and teacher alike) and moves by ~0.01 between
      random grids; a background greyed to 0 (+0.37) or strokes gone to black (-0.63) cross 0.3.
    - min_diversity 0.25: a quarter of the first grid's mean pairwise feature distance. Random real grids stay
      within ~5 % of each other (ratio 0.95-1.05); a student may sharpen and lose some, but one image for every
      prompt gives 0.
    """

    max_saturation: float = 0.75
    max_drift: float = 0.3
    min_diversity: float = 0.25

    def __post_init__(self) -> None:
        for name in ("max_saturation", "max_drift", "min_diversity"):
            value = getattr(self, name)
            if not 0.0 <= value <= (1.0 if name == "max_saturation" else 2.0):
                raise ValueError(f"{name}: {value} is out of range")


@dataclass(frozen=True)
class Trip:
    """Which statistic tripped: its name, this validation's value, the threshold, and for how many validations
    in a row it has been out of bounds."""

    stat: str
    value: float
    threshold: float
    validations: int

    def __str__(self) -> str:
        side = "below" if self.stat == "diversity" else "above"
        return (f"collapse guard: {self.stat} {self.value:.3f} has been {side} {self.threshold:g} for "
                f"{self.validations} validations in a row")


@dataclass
class Guard:
    """Feed it one GridStats per validation (`update`); it returns the statistics that have been out of bounds
    for `patience` validations in a row (empty while none has). The first validation is the reference for drift
    and relative diversity, so it never trips those two itself."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    patience: int = 3
    first: GridStats | None = None
    streaks: dict[str, int] = field(default_factory=lambda: {"saturation": 0, "drift": 0, "diversity": 0})

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience: must be >= 1, got {self.patience}")

    def relative(self, stats: GridStats) -> dict[str, float]:
        """saturation as measured, drift from the first grid, diversity as a fraction of the first grid's."""
        first = self.first or stats
        base = first.diversity
        return {"saturation": stats.saturation,
                "drift": mean_drift(stats.channel_means, first.channel_means),
                # A first grid of identical images has no diversity to lose: its ratio stays 1.
                "diversity": stats.diversity / base if base > 0 else 1.0}

    def update(self, stats: GridStats) -> list[Trip]:
        if self.first is None:
            self.first = stats
        t = self.thresholds
        values = self.relative(stats)
        out = {"saturation": values["saturation"] > t.max_saturation,
               "drift": values["drift"] > t.max_drift,
               "diversity": values["diversity"] < t.min_diversity}
        limits = {"saturation": t.max_saturation, "drift": t.max_drift, "diversity": t.min_diversity}
        trips = []
        for name, bad in out.items():
            self.streaks[name] = self.streaks[name] + 1 if bad else 0
            if self.streaks[name] >= self.patience:
                trips.append(Trip(name, values[name], limits[name], self.streaks[name]))
        return trips


def from_spec(spec: GuardSpecLike) -> Guard:
    """The Guard of a run's `train.guard`."""
    return Guard(Thresholds(spec.max_saturation, spec.max_drift, spec.min_diversity), spec.patience)


def health_metrics(guard: Guard, stats: GridStats) -> dict[str, float]:
    """What the dashboard's health charts show at a validation: the statistics the guard judges."""
    return {f"health/{name}": value for name, value in guard.relative(stats).items()}
