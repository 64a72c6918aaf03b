"""Did the shipped digits teacher memorise the held-out digits? (It was trained on all 1797, `teacher.Recipe.subset`.)

The held-out split (`evaluate.split_indices`) was never seen by the evaluator or by a GAN reading `digits-train`,
but the shipped teacher was trained on every digit, held-out ones included. A student distilled from it could
therefore score well against the held-out reference by reproducing digits its teacher memorised. This measures
how close the teacher's samples sit to the held-out digits compared with how close *other real digits* sit to
them: for each query image, the distance to its nearest held-out digit (in the evaluator's feature space and in
pixel space). The reference queries are train-split digits (unseen-by-construction neighbours of the held-out
set). A teacher that copies its training images would put many samples nearer a held-out digit than almost any
real digit is ("near copies": below the 5th percentile of the real queries' distances).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor


def nn_distances(queries: Tensor, reference: Tensor) -> np.ndarray:
    """Each query row's distance to its nearest reference row (rows flattened)."""
    q = queries.reshape(queries.shape[0], -1).double()
    r = reference.reshape(reference.shape[0], -1).double()
    return torch.cdist(q, r).min(1).values.numpy()


def copy_report(sample_feats: Tensor, sample_pixels: Tensor, real_feats: Tensor, real_pixels: Tensor,
                heldout_feats: Tensor, heldout_pixels: Tensor, quantile: float = 0.05) -> dict[str, Any]:
    """Nearest-held-out distances of samples vs of real (train-split) digits, in feature and pixel space."""
    out: dict[str, Any] = {}
    for space, s, r, h in (("features", sample_feats, real_feats, heldout_feats),
                           ("pixels", sample_pixels, real_pixels, heldout_pixels)):
        ds, dr = nn_distances(s, h), nn_distances(r, h)
        cut = float(np.quantile(dr, quantile))
        out[space] = {"median_nn_samples": float(np.median(ds)), "median_nn_real": float(np.median(dr)),
                      f"real_q{quantile:g}": cut, "near_copy_fraction_samples": float((ds < cut).mean()),
                      "near_copy_fraction_real": float((dr < cut).mean())}
    return out


def teacher_copy_check(per_class: int = 100, guidance: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The teacher's 50-step samples (CFG `guidance`) vs train-split digits, both measured to the held-out digits."""
    from trainer.jobspec import ModelSpec
    from trainer.models import load_teacher
    from trainer.toy.evaluate import default_evaluator, real_digits, split_indices
    from trainer.toy.teacher_sampling import eval_labels, generate

    ev = default_evaluator()
    teacher = load_teacher(ModelSpec(teacher="toy:digits"))
    images, labels = real_digits()
    tr, te = split_indices(labels)
    samples = generate(teacher, eval_labels(per_class), method="euler", steps=50, guidance=guidance, seed=seed)
    # As many real queries as the train split has, against the same held-out set.
    rep = copy_report(ev.features(samples), samples, ev.features(images[tr]), images[tr],
                      ev.features(images[te]), images[te])
    return {"per_class": per_class, "guidance": guidance, "seed": seed, "n_samples": int(samples.shape[0]),
            "n_real_queries": len(tr), "n_heldout": len(te), **rep}
