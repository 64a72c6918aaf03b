"""Metrics on digits-CNN features (trainer/toy/evaluate.py computes the features; these take them as arrays).

- `fd`: the Frechet distance between Gaussians fitted to two feature sets,
  ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The trace of the matrix square root is computed
  as the sum of sqrt(eigenvalues) of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2) (same eigenvalues as S_a S_b),
  in float64 with eigh, so it is real and stable without scipy's sqrtm. Like FID it is biased by the sample count:
  compare numbers at the same N.
- `diversity_from_features`: the mean pairwise feature distance among samples with the same label, averaged over
  labels. Collapse (every "seven" alike) shows as a value well below the real digits' own.
- `manifold_metrics`: k-NN precision/recall and density/coverage, which tell a better FD apart from fewer modes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

PR_K = 5  # k of the k-NN balls of precision/recall and density/coverage (both papers' default)


def feature_stats(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] -> (mean [D], covariance [D, D]) in float64 (unbiased covariance, as FID)."""
    f = np.asarray(feats.detach().cpu() if isinstance(feats, Tensor) else feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fd_from_stats(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b)."""
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
    root_a = _sqrt_psd(cov_a)
    inner = root_a @ cov_b @ root_a  # symmetric PSD, eigenvalues = those of cov_a @ cov_b
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt, 0.0))


def fd(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    return fd_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def accuracy_from_logits(logits: Tensor, labels: Tensor | Sequence[int]) -> float:
    labels = torch.as_tensor(labels)
    return (logits.argmax(-1).cpu() == labels.cpu()).float().mean().item()


def diversity_from_features(feats: Tensor, labels: Tensor | Sequence[int]) -> float:
    """Mean pairwise L2 distance between features with the same label, averaged over labels (those with >= 2)."""
    feats, labels = torch.as_tensor(feats, dtype=torch.float64), torch.as_tensor(labels)
    per_class = []
    for c in labels.unique():
        f = feats[labels == c]
        n = f.shape[0]
        if n < 2:
            continue
        d = torch.cdist(f, f)  # [n, n], zero diagonal
        per_class.append(d.sum().item() / (n * (n - 1)))
    if not per_class:
        raise ValueError("intra-class diversity needs at least two samples of some class")
    return float(np.mean(per_class))


def _knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row."""
    d = np.sqrt(np.maximum(_sq_dists(feats, feats), 0))
    np.fill_diagonal(d, np.inf)
    return np.partition(d, k - 1, axis=1)[:, k - 1]


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T


def manifold_metrics(real: Tensor | np.ndarray, fake: Tensor | np.ndarray, k: int = PR_K) -> dict[str, float]:
    """k-NN manifold metrics of `fake` against `real` features ([N, D] each), so that a better FD can be told
    apart from fewer modes.

    precision, recall (Kynkaenniemi et al. 2019, Eq. 1-2): the real (fake) manifold is the union of balls around
    each real (fake) point with radius its distance to its k-th nearest neighbour in the same set; precision is
    the fraction of fakes inside the real manifold, recall the fraction of reals inside the fake manifold.
    density, coverage (Naeem et al. 2020, Eq. 3-4): only the real balls; density = sum over fakes of the number
    of real balls containing them / (k * #fakes) (1 on average for matching distributions, can exceed 1), coverage
    = the fraction of real balls holding at least one fake. Mode dropping lowers recall and coverage.
    """
    r = np.asarray(real.detach().cpu() if isinstance(real, Tensor) else real, dtype=np.float64)
    f = np.asarray(fake.detach().cpu() if isinstance(fake, Tensor) else fake, dtype=np.float64)
    if r.shape[0] <= k or f.shape[0] <= k:
        raise ValueError(f"manifold metrics need more than k={k} real and fake rows, got {r.shape[0]}, {f.shape[0]}")
    rad_r, rad_f = _knn_radii(r, k), _knn_radii(f, k)
    d = np.sqrt(np.maximum(_sq_dists(r, f), 0))  # [n_real, n_fake]
    inside_real = d <= rad_r[:, None]  # fake j inside real ball i
    return {"precision": float(inside_real.any(0).mean()),
            "recall": float((d <= rad_f[None, :]).any(1).mean()),
            "density": float(inside_real.sum() / (k * f.shape[0])),
            "coverage": float(inside_real.any(1).mean())}
