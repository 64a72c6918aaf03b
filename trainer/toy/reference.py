"""The teacher's reference for the digits metrics, cached: (mu, cov) and features of its 50-step CFG samples.

They are the slowest part of scoring a digits run and the same on every run, so they are looked up by a key over
(teacher weights and scheduler config, evaluator weights, sampler settings): in the caller's folders, the shipped
`EVALUATOR_DIR/reference/`, then the flashdmd cache. A retrained teacher or evaluator changes the key.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from trainer.toy import EVALUATOR_DIR
from trainer.toy.evaluate import DigitsEvaluator, default_evaluator, digest_tensors
from trainer.toy.metrics import feature_stats
from trainer.toy.teacher_sampling import DEFAULT_GUIDANCE, EVAL_PER_CLASS, eval_labels, generate

REFERENCE_STEPS = 50


def teacher_digest(teacher: Any) -> str:
    """A hash of the teacher's weights and scheduler config (what its samples depend on)."""
    h = hashlib.sha256()
    for name, mod in [("denoiser", teacher.denoiser), ("vae", teacher.vae)] + [
            (f"te{i}", m) for i, m in enumerate(teacher.text_encoders())]:
        h.update(name.encode())
        h.update(digest_tensors(mod.state_dict()).encode())
    h.update(json.dumps(dict(teacher.pipe.scheduler.config), sort_keys=True, default=str).encode())
    return h.hexdigest()


def reference_key(teacher: Any, evaluator: DigitsEvaluator, *, per_class: int, steps: int, guidance: float,
                  seed: int) -> str:
    spec = dict(teacher=teacher_digest(teacher), evaluator=evaluator.digest, per_class=per_class, steps=steps,
                guidance=float(guidance), seed=seed, method="euler", resolution=teacher.resolution)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    from trainer.cache import flashdmd_cache

    return flashdmd_cache() / "toy"


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
