"""The digits evaluator (issue #5, part 2): a small CNN trained on real digits, and metrics on its features.

The CNN (`DigitsCNN`): 3x32x32 input in [-1, 1] (the same tensors `DigitsDataset(32)` and the VAE produce),
conv 32-32 / pool / conv 64-64 / pool / conv 64, global average pool -> the 64-d **feature** vector (the
penultimate layer, post-ReLU like Inception's pool3), dropout, linear -> 10 logits. It is trained on a stratified
80/20 split of sklearn's 1797 digits (`split_indices`, seed 0) with light affine augmentation (rotation +-10 deg,
scale 0.9-1.1, shift +-2 px) so that it generalises to generated digits, which are not exact bilinear upsamplings.
The shipped weights (`trainer/toy/digits_evaluator/`) are rebuilt with `flashdmd toy train-evaluator`.

Metrics (all take images [N, 3, 32, 32] in [-1, 1] and the digit each was *prompted* with):
- `accuracy`: the fraction classified as the prompted digit (the CLIP-score analogue: prompt adherence).
- `fd`: the Frechet distance between Gaussians fitted to two feature sets,
  ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)). The trace of the matrix square root is computed
  as the sum of sqrt(eigenvalues) of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2) (same eigenvalues as S_a S_b),
  in float64 with eigh, so it is real and stable without scipy's sqrtm.
  "digits-FD" is `fd` on CNN features, against (a) all 1797 real digits and (b) the teacher's own 50-step CFG
  samples (`teacher_reference`, cached). Accuracy saturates even for 1-step samples, so FD is the headline.
  Like FID it is biased by the sample count: compare numbers at the same N (`EVAL_PER_CLASS` x 10 = 1000).
- `intra_class_diversity`: the mean pairwise feature distance among samples prompted with the same digit,
  averaged over digits. Collapse (every "seven" alike) shows as a value well below the real digits' own.

Teacher samplers (`generate`): "euler" is the pipeline's own EulerDiscreteScheduler (a fresh instance per call, so
nothing mutable is shared); "ddim" is deterministic DDIM written out on an explicit timestep list;
"renoise" is our few-step sampler `trainer.sampling.sample` (predict x0, re-noise with fresh noise). Each image's
noise comes from its own seed, so results do not depend on the batch size.
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
from trainer.toy.prompts import digit_prompt

EVAL_PER_CLASS = 100  # generated samples per digit for FD/diversity: N = 1000
REFERENCE_STEPS = 50
# The teacher's CFG for its own evaluation (`flashdmd toy eval-teacher`). A student's reference must instead be sampled
# at the CFG the student was distilled with (`distill.real_guidance`): callers pass it as `guidance`.
DEFAULT_GUIDANCE = 2.0
PR_K = 5  # k of the k-NN balls of precision/recall and density/coverage (both papers' default)
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


# ---------------------------------------------------------------------------------------------------- metrics


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


class DigitsEvaluator:
    """The trained CNN plus cached real-digit statistics."""

    def __init__(self, model: DigitsCNN, meta: dict | None = None, digest: str | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.meta = meta or {}
        self.digest = digest or _digest_tensors(model.state_dict())
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


# -------------------------------------------------------------------------------------------- teacher samples


def eval_labels(per_class: int = EVAL_PER_CLASS) -> Tensor:
    """[10 * per_class] labels 0..9, 0..9, ... (every batch sees every digit)."""
    return torch.arange(10).repeat(per_class)


def _per_image_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _cfg_eps(teacher: Any, x: Tensor, t: Tensor, cond: Any, uncond: Any, guidance: float) -> Tensor:
    from trainer.models import Cond, predict

    if guidance == 1.0:
        return predict(teacher.denoiser, x, t, cond, teacher.param)
    both = predict(teacher.denoiser, torch.cat([x, x]), torch.cat([t, t]), Cond.cat([uncond, cond]), teacher.param)
    e_u, e_c = both.chunk(2)
    return e_u + guidance * (e_c - e_u)


@torch.no_grad()
def _euler(teacher: Any, noise: Tensor, cond: Any, uncond: Any, steps: int, guidance: float) -> Tensor:
    """The pipeline's sampler: a fresh EulerDiscreteScheduler from the teacher's config (no shared state)."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_config(teacher.pipe.scheduler.config)
    sched.set_timesteps(steps, device="cpu")
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        eps = _cfg_eps(teacher, inp, t.long().expand(x.shape[0]), cond, uncond, guidance)
        x = sched.step(eps, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def _ddim(teacher: Any, noise: Tensor, cond: Any, uncond: Any, timesteps: Sequence[int], guidance: float) -> Tensor:
    """Deterministic DDIM (eta 0) over `timesteps` (high noise first), finishing with the last x0 estimate."""
    param = teacher.param
    x = noise
    x0 = x
    for i, t in enumerate(timesteps):
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long)
        eps = _cfg_eps(teacher, x, tt, cond, uncond, guidance)
        x0 = param.to_x0(x, eps, tt)
        if i + 1 < len(timesteps):
            a, s = param.coefs(torch.full((x.shape[0],), int(timesteps[i + 1]), dtype=torch.long))
            x = (a.float().view(-1, 1, 1, 1) * x0 + s.float().view(-1, 1, 1, 1) * eps).to(x.dtype)
    return x0


def generate(teacher: Any, labels: Tensor | Sequence[int], *, method: str = "euler", steps: int = 50,
             timesteps: Sequence[int] | None = None, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
             batch: int = 250, progress: bool = False) -> Tensor:
    """Teacher samples for `labels` (prompted digits): images [N, 3, R, R] in [-1, 1].

    method: "euler" (the pipeline's scheduler, `steps`), "ddim" or "renoise" (on `timesteps`, default
    [999, 749, 499, 249]). Image i uses seed `seed * 1_000_003 + i` for all of its noise.
    """
    from trainer.sampling import sample

    labels = torch.as_tensor(labels)
    ts = list(timesteps or [999, 749, 499, 249])
    shape = teacher.latent_shape(1)[1:]
    prompts = [digit_prompt(int(c)) for c in range(10)]
    cond_all = teacher.encode(prompts)
    out = []
    for lo in tqdm(range(0, len(labels), batch), desc=f"sample {method}", disable=not progress, leave=False):
        lab = labels[lo:lo + batch]
        seeds = [seed * 1_000_003 + lo + j for j in range(len(lab))]
        cond = cond_all[lab]
        uncond = teacher.uncond(len(lab))
        if method == "renoise":
            lat = sample(teacher.denoiser, cond, ts, teacher.param, seeds=seeds, latent_shape=shape,
                         guidance=guidance, uncond=uncond)
        else:
            noise = _per_image_noise(seeds, shape)
            if method == "euler":
                lat = _euler(teacher, noise, cond, uncond, steps, guidance)
            elif method == "ddim":
                lat = _ddim(teacher, noise, cond, uncond, ts, guidance)
            else:
                raise ValueError(f"unknown sampler {method!r} (euler, ddim, renoise)")
        with torch.no_grad():
            out.append(teacher.decode(lat).clamp(-1, 1))
    return torch.cat(out)


# --------------------------------------------------------------------------------- teacher reference (cached)


def _digest_tensors(state: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def teacher_digest(teacher: Any) -> str:
    """A hash of the teacher's weights and scheduler config (what its samples depend on)."""
    h = hashlib.sha256()
    for name, mod in [("denoiser", teacher.denoiser), ("vae", teacher.vae)] + [
            (f"te{i}", m) for i, m in enumerate(teacher.text_encoders())]:
        h.update(name.encode())
        h.update(_digest_tensors(mod.state_dict()).encode())
    h.update(json.dumps(dict(teacher.pipe.scheduler.config), sort_keys=True, default=str).encode())
    return h.hexdigest()


def reference_key(teacher: Any, evaluator: DigitsEvaluator, *, per_class: int, steps: int, guidance: float,
                  seed: int) -> str:
    spec = dict(teacher=teacher_digest(teacher), evaluator=evaluator.digest, per_class=per_class, steps=steps,
                guidance=float(guidance), seed=seed, method="euler", resolution=teacher.resolution)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    from trainer.tiny import _cache_root

    return _cache_root(None) / "toy"


def teacher_reference(teacher: Any, evaluator: DigitsEvaluator | None = None, *,
                      per_class: int = EVAL_PER_CLASS, steps: int = REFERENCE_STEPS,
                      guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                      cache_dir: str | Path | None = None, search: Sequence[str | Path] = (),
                      progress: bool = True, samples: Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, cov) of the CNN features of the teacher's `steps`-step CFG Euler samples (10 x per_class of them).

    Looked up by a key over (teacher weights, evaluator weights, settings) in `search` folders, then in the shipped
    `EVALUATOR_DIR/reference/`, then in `cache_dir` (default: the flashdmd cache, `$FLASHDMD_CACHE/toy` or
    ~/.cache/flashdmd/toy); generated and written to `cache_dir` on a miss. `samples`: the images
    `generate(teacher, eval_labels(per_class), method="euler", steps=steps, guidance=guidance, seed=seed)` returns,
    when the caller already has them (they are used on a miss instead of sampling again).
    """
    from safetensors.numpy import load_file, save_file

    evaluator = evaluator or default_evaluator()
    key = reference_key(teacher, evaluator, per_class=per_class, steps=steps, guidance=guidance, seed=seed)
    name = f"teacher{steps}-{key}.safetensors"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for folder in [*map(Path, search), EVALUATOR_DIR / "reference", cache]:
        if (folder / name).is_file():
            st = load_file(str(folder / name))
            return st["mu"], st["cov"]
    images = samples if samples is not None else generate(
        teacher, eval_labels(per_class), method="euler", steps=steps, guidance=guidance, seed=seed,
        progress=progress)
    mu, cov = feature_stats(evaluator.features(images))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{name}.{time.monotonic_ns()}.tmp"
    save_file({"mu": mu, "cov": cov}, str(tmp), metadata={
        "steps": str(steps), "guidance": str(guidance), "per_class": str(per_class), "seed": str(seed)})
    tmp.replace(cache / name)
    return mu, cov


def features_key(teacher: Any, evaluator: DigitsEvaluator, *, steps: int, guidance: float, seed: int) -> str:
    """The cache key of `teacher_features`: everything the features depend on except how many there are (image i
    has label i % 10 and seed `seed * 1_000_003 + i`, so a smaller per_class is a prefix of a larger one)."""
    spec = dict(teacher=teacher_digest(teacher), evaluator=evaluator.digest, steps=steps, guidance=float(guidance),
                seed=seed, method="euler", resolution=teacher.resolution, kind="features")
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def teacher_features(teacher: Any, evaluator: DigitsEvaluator | None = None, *, per_class: int = EVAL_PER_CLASS,
                     steps: int = REFERENCE_STEPS, guidance: float = DEFAULT_GUIDANCE, seed: int = 0,
                     cache_dir: str | Path | None = None, search: Sequence[str | Path] = (),
                     progress: bool = True, samples: Tensor | None = None) -> Tensor:
    """CNN features [10 * per_class, 64] of `generate(teacher, eval_labels(per_class), method="euler", ...)`.

    The teacher's 50-step samples are the slowest part of scoring a digits run (about a minute for N = 500 on
    one core) and the same on every run, so their features are looked up, like `teacher_reference`, by a key over
    (teacher weights + scheduler config, evaluator weights, sampler settings) in `search`, the shipped
    `EVALUATOR_DIR/reference/`, then `cache_dir`. A file holding at least N rows answers with its first N; on a
    miss the samples are generated (or `samples` used: what that `generate` call returns, when the caller has
    them) and written to `cache_dir`. A retrained teacher or evaluator changes the key, so stale features are
    never used.
    """
    from safetensors.torch import load_file, save_file

    evaluator = evaluator or default_evaluator()
    key = features_key(teacher, evaluator, steps=steps, guidance=guidance, seed=seed)
    name = f"features{steps}-{key}.safetensors"
    n = 10 * per_class
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for folder in [*map(Path, search), EVALUATOR_DIR / "reference", cache]:
        if (folder / name).is_file():
            feats = load_file(str(folder / name))["features"]
            if feats.shape[0] >= n:
                return feats[:n].clone()
    images = samples if samples is not None else generate(
        teacher, eval_labels(per_class), method="euler", steps=steps, guidance=guidance, seed=seed, progress=progress)
    feats = evaluator.features(images)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{name}.{time.monotonic_ns()}.tmp"
    save_file({"features": feats.contiguous()}, str(tmp), metadata={
        "steps": str(steps), "guidance": str(guidance), "per_class": str(per_class), "seed": str(seed),
        "teacher": teacher_digest(teacher), "evaluator": evaluator.digest})
    tmp.replace(cache / name)
    return feats
