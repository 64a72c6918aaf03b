"""The digits evaluator: a small CNN trained on real digits, and the metrics of one sample set on its features.

The CNN (`DigitsCNN`): 3x32x32 input in [-1, 1] (the same tensors `DigitsDataset(32)` and the VAE produce),
conv 32-32 / pool / conv 64-64 / pool / conv 64, global average pool -> the 64-d **feature** vector (the
penultimate layer, post-ReLU like Inception's pool3), dropout, linear -> 10 logits. It is trained on a stratified
80/20 split of sklearn's 1797 digits (`split_indices`, seed 0) with light affine augmentation (rotation +-10 deg,
scale 0.9-1.1, shift +-2 px) so that it generalises to generated digits, which are not exact bilinear upsamplings.
The shipped weights (`trainer/toy/digits_evaluator/`) are rebuilt with `flashdmd toy train-evaluator`.

`DigitsEvaluator.report` scores images [N, 3, 32, 32] in [-1, 1] against the digit each was *prompted* with:
- `accuracy`: the fraction classified as the prompted digit (the CLIP-score analogue: prompt adherence).
- "digits-FD": `fd` (trainer/toy/metrics.py) on CNN features, against all 1797 real digits, the held-out split,
  and the teacher's own 50-step CFG samples (trainer/toy/reference.py, cached). Accuracy saturates even for
  1-step samples, so FD is the headline. Compare numbers at the same N (`EVAL_PER_CLASS` x 10 = 1000).
- `intra_class_diversity` and the k-NN manifold metrics (trainer/toy/metrics.py).
The teacher's samples come from trainer/toy/teacher_sampling.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from trainer.data import DigitsDataset, digits_split
from trainer.toy import EVALUATOR_DIR, RESOLUTION
from trainer.toy.metrics import (
    accuracy_from_logits,
    diversity_from_features,
    fd,
    fd_from_stats,
    feature_stats,
    manifold_metrics,
)

FEATURE_DIM = 64
WEIGHTS = "model.safetensors"

# ------------------------------------------------------------------------------------------------------ model


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_classes: int = 10,
                 dropout: float = 0.3) -> None:
        super().__init__()
        w = width

        def conv(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            conv(3, w), conv(w, w), nn.MaxPool2d(2),  # 16x16
            conv(w, 2 * w), conv(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            conv(2 * w, feature_dim), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        """[B, 3, 32, 32] in [-1, 1] -> [B, feature_dim] penultimate activations."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def real_digits(resolution: int = RESOLUTION) -> tuple[Tensor, Tensor]:
    """All 1797 real digits: images [N, 3, R, R] in [-1, 1] and labels [N]."""
    ds = _digits(resolution)
    return ds.images, torch.tensor(ds.labels)


@lru_cache(maxsize=2)
def _digits(resolution: int) -> DigitsDataset:
    return DigitsDataset(resolution)


def split_indices(labels: Tensor, seed: int = 0, test_frac: float = 0.2) -> tuple[Tensor, Tensor]:
    """A stratified train/held-out split of the real digits (deterministic in seed): `trainer.data.digits_split`,
    the one split the evaluator, the GAN's reals (`builtin: digits-train`) and the FD reference all use."""
    tr, te = digits_split(labels.tolist(), seed, test_frac)
    return torch.from_numpy(tr), torch.from_numpy(te)


def augment(x: Tensor, gen: torch.Generator, max_deg: float = 10.0, scale: float = 0.1,
            shift_px: float = 2.0) -> Tensor:
    """Random affine per image (background -1 fills the border). x: [B, 3, R, R]."""
    b, r = x.shape[0], x.shape[-1]
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_deg)
    s = 1 + (torch.rand(b, generator=gen) * 2 - 1) * scale
    sh = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * shift_px / r)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin, sh[:, 0]], 1), torch.stack([sin, cos, sh[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_evaluator(out_dir: str | Path = EVALUATOR_DIR, seed: int = 0, epochs: int = 30, batch: int = 64,
                    lr: float = 2e-3, progress: bool = True, command: str | None = None,
                    max_steps: int | None = None) -> dict[str, Any]:
    """Train the CNN on the train split, report test accuracy, save `model.safetensors` + `config.json`."""
    with torch.random.fork_rng(devices=[]):  # seeds the global CPU RNG (init, dropout) without leaking it
        torch.manual_seed(seed)
        return _train_evaluator(Path(out_dir), seed, epochs, batch, lr, progress, command, max_steps)


def _train_evaluator(out: Path, seed: int, epochs: int, batch: int, lr: float, progress: bool,
                     command: str | None, max_steps: int | None) -> dict[str, Any]:
    from safetensors.torch import save_file

    images, labels = real_digits()
    tr, te = split_indices(labels)
    model = DigitsCNN()
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(tr) / batch)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.monotonic()
    bar = tqdm(total=total, desc="evaluator", disable=not progress, dynamic_ncols=True)
    step, loss_avg = 0, None
    model.train()
    while step < total:
        perm = tr[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(perm), batch):
            if step >= total:
                break
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[i:i + batch]
            x = augment(images[idx], gen)
            x = x + 0.05 * torch.randn(x.shape, generator=gen)
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.3f}")
    bar.close()
    model.eval()
    ev = DigitsEvaluator(model)
    meta = {
        "command": command,
        "seed": seed,
        "epochs": epochs,
        "steps": step,
        "batch": batch,
        "lr": lr,
        "train_loss_ema": loss_avg,
        "test_accuracy": ev.accuracy(images[te], labels[te]),
        "train_accuracy": ev.accuracy(images[tr], labels[tr]),
        "split": {"seed": 0, "test_frac": 0.2, "train": len(tr), "test": len(te)},
        "minutes": (time.monotonic() - t0) / 60,
        "feature_dim": FEATURE_DIM,
        "torch": torch.__version__,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


class DigitsEvaluator:
    """The trained CNN plus cached real-digit statistics."""

    def __init__(self, model: DigitsCNN, meta: dict | None = None, digest: str | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.meta = meta or {}
        self.digest = digest or digest_tensors(model.state_dict())
        self._real: tuple[np.ndarray, np.ndarray] | None = None
        self._heldout: tuple[Tensor, tuple[np.ndarray, np.ndarray]] | None = None

    @classmethod
    def load(cls, path: str | Path = EVALUATOR_DIR) -> DigitsEvaluator:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / WEIGHTS).is_file():
            raise FileNotFoundError(f"no evaluator weights at {path / WEIGHTS}; run `flashdmd toy train-evaluator`")
        model = DigitsCNN()
        model.load_state_dict(load_file(str(path / WEIGHTS)))
        meta = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        return cls(model, meta)

    @torch.no_grad()
    def features(self, images: Tensor, batch: int = 500) -> Tensor:
        """[N, 3, 32, 32] in [-1, 1] -> [N, 64] float32."""
        x = images.float().clamp(-1, 1).cpu()
        return torch.cat([self.model.features(c) for c in x.split(batch)])

    @torch.no_grad()
    def logits(self, images: Tensor, batch: int = 500) -> Tensor:
        return self.model.head(self.features(images, batch))

    def accuracy(self, images: Tensor, labels: Tensor | Sequence[int]) -> float:
        return accuracy_from_logits(self.logits(images), labels)

    def intra_class_diversity(self, images: Tensor, labels: Tensor | Sequence[int]) -> float:
        return diversity_from_features(self.features(images), labels)

    def real_stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self._real is None:
            self._real = feature_stats(self.features(real_digits()[0]))
        return self._real

    def heldout(self) -> tuple[Tensor, tuple[np.ndarray, np.ndarray]]:
        """Features of the held-out real digits (`split_indices`' test part: never seen by this evaluator, nor by
        a GAN reading `digits-train`) and their (mu, cov): the FD reference of `fd_heldout`."""
        if self._heldout is None:
            images, labels = real_digits()
            f = self.features(images[split_indices(labels)[1]])
            self._heldout = (f, feature_stats(f))
        return self._heldout

    def fd_real(self, images: Tensor) -> float:
        return fd_from_stats(*feature_stats(self.features(images)), *self.real_stats())

    def report(self, images: Tensor, labels: Tensor | Sequence[int],
               reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """All metrics of one sample set; `reference` = teacher-50 (mu, cov) from `teacher_reference`."""
        return self.report_features(self.features(images), labels, reference)

    def report_features(self, feats: Tensor, labels: Tensor | Sequence[int],
                        reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
        """`report` from features [N, 64] this evaluator computed (e.g. cached by `teacher_features`)."""
        stats = feature_stats(feats)
        held_feats, held_stats = self.heldout()
        out = {
            "accuracy": accuracy_from_logits(self.model.head(feats), labels),
            "fd_real": fd_from_stats(*stats, *self.real_stats()),
            "fd_heldout": fd_from_stats(*stats, *held_stats),
            **manifold_metrics(held_feats, feats),
            "diversity": diversity_from_features(feats, labels),
            "n": int(feats.shape[0]),
        }
        if reference is not None:
            out["fd_teacher"] = fd_from_stats(*stats, *reference)
        return out

    def real_baselines(self, seed: int = 0, sizes: Sequence[int] = (500, 1000)) -> dict[str, Any]:
        """The real digits scored like samples: the FD noise floor (train vs test split), diversity, accuracy.

        `floor`: the train-split digits (never the reference) scored against the held-out ones exactly as samples
        are, at N = each of `sizes` (random subsets, seed 0) and at all of them: FD's small-sample bias plus the
        real train/held-out gap. No sampler can be expected below it at that N."""
        images, labels = real_digits()
        tr, te = split_indices(labels, seed)
        f = self.features(images)
        gen = torch.Generator().manual_seed(0)
        floor = {}
        for n in [*[s for s in sizes if s < len(tr)], len(tr)]:
            pick = tr[torch.randperm(len(tr), generator=gen)[:n]]
            rep = self.report_features(f[pick], labels[pick])
            floor[str(n)] = {k: rep[k] for k in ("fd_heldout", "precision", "recall", "density", "coverage",
                                                  "accuracy", "diversity")}
        return {
            "test_accuracy": accuracy_from_logits(self.model.head(f[te]), labels[te]),
            "fd_train_vs_test": fd(f[tr], f[te]),
            "fd_test_vs_all": fd(f[te], f),
            "diversity": diversity_from_features(f, labels),
            "floor": floor,
        }


@lru_cache(maxsize=1)
def default_evaluator() -> DigitsEvaluator:
    """The shipped evaluator, loaded once per process (read-only use)."""
    return DigitsEvaluator.load()


def accuracy(images: Tensor, labels: Tensor | Sequence[int], evaluator: DigitsEvaluator | None = None) -> float:
    """Prompt adherence: the fraction of images the CNN classifies as their prompted digit."""
    return (evaluator or default_evaluator()).accuracy(images, labels)


def intra_class_diversity(images: Tensor, labels: Tensor | Sequence[int],
                          evaluator: DigitsEvaluator | None = None) -> float:
    """Mean pairwise CNN-feature distance within each prompted digit, averaged over digits."""
    return (evaluator or default_evaluator()).intra_class_diversity(images, labels)


def digest_tensors(state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()
