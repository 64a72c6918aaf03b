"""Aspect-ratio buckets: SDXL's size list or one derived from a pixel budget, assignment by aspect
ratio, resize-to-cover + crop with SDXL's size/crop conditioning, and a batch sampler whose batches never mix
buckets.

SDXL was trained with micro-conditioning time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w):
the image's size before any resize, the top-left corner of the crop in the resized image, and the bucket
size (SDXL paper §2.2-2.3; diffusers' train_text_to_image_sdxl builds the same tuple). `fit` records exactly
those numbers, so the raw-image path and `flashdmd data prepare` produce the same tensors for one image.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from trainer.errors import InputError

Size = tuple[int, int]  # (height, width) in pixels

# SDXL's multi-aspect buckets (SDXL paper, appendix): (height, width), ~1024^2 pixels each, sides step 64.
SDXL_BUCKETS: list[Size] = [
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1344, 704), (1408, 704), (1472, 704),
    (1536, 640), (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
    (2048, 512),
]


def derive_buckets(target_pixels: int, step: int = 64, max_ratio: float = 4.0) -> list[Size]:
    """Sizes whose sides are multiples of `step`, as close to `target_pixels` as possible without exceeding it,
    with aspect ratios up to max_ratio:1 either way; sorted from widest... to tallest (by h/w)."""
    if step < 1 or target_pixels < step * step:
        raise InputError(f"data.buckets.target_pixels {target_pixels} is below one {step}x{step} bucket")
    out: set[Size] = set()
    w = step
    while w * step <= target_pixels:
        h = (target_pixels // w) // step * step
        if h >= step and max(h / w, w / h) <= max_ratio:
            out.add((h, w))
        w += step
    return sorted(out, key=lambda s: (s[0] / s[1], s[0]))


def assign(orig: Size, buckets: Sequence[Size]) -> int:
    """The bucket whose aspect ratio is closest to the image's (in log ratio, so 2:1 and 1:2 are equally far
    from 1:1); ties go to the first in the list."""
    h, w = orig
    ar = math.log(h / w)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ar))


def crop_seed(seed: int, key: str) -> int:
    """Per-sample crop randomness keyed by (seed, sample key): the same crop in every process and every run."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Fitted:
    image: Image.Image  # RGB, exactly `target` in size
    orig: Size
    crop: Size  # (top, left) in the resized image
    target: Size

    @property
    def time_ids(self) -> list[float]:
        """SDXL's add_time_ids for this sample."""
        return [float(v) for v in (*self.orig, *self.crop, *self.target)]


def fit(img: Image.Image, target: Size, crop: str = "center", seed: int = 0, key: str = "") -> Fitted:
    """Resize so the image covers `target` (aspect ratio kept), then crop `target` out of it."""
    img = img.convert("RGB")
    w, h = img.size
    th, tw = target
    s = max(th / h, tw / w)
    rw, rh = max(tw, round(w * s)), max(th, round(h * s))
    resized = img.resize((rw, rh), Image.BICUBIC)
    if crop == "random":
        rng = random.Random(crop_seed(seed, key))
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    else:
        top, left = (rh - th) // 2, (rw - tw) // 2
    return Fitted(resized.crop((left, top, left + tw, top + th)), (h, w), (top, left), target)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """[3, H, W] uint8: what the cache stores, so cached and raw pixels are bit-identical after `to_float`."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [.., 3, H, W] -> float in [-1, 1] (the same arithmetic as trainer.data.to_tensor)."""
    return pixels.float() / 127.5 - 1.0


def epoch_batches(buckets_of: Sequence[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches: a seeded permutation, split by bucket into full batches, the batches shuffled.

    Incomplete batches are dropped (a fixed batch size keeps the per-sample noise keys and the loss scale
    of every step alike); the number of batches per epoch does not depend on the seed.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(buckets_of), generator=g).tolist()
    by_bucket: dict[int, list[int]] = {}
    for i in perm:
        by_bucket.setdefault(buckets_of[i], []).append(i)
    out = [idx[j:j + batch] for _, idx in sorted(by_bucket.items())
           for j in range(0, len(idx) - batch + 1, batch)]
    order = torch.randperm(len(out), generator=g).tolist()
    return [out[j] for j in order]


class BucketBatchSampler:
    """ShardSampler's contract (trainer/data.py) with batches that each come from one bucket.

    The global sequence of batches is the concatenation of per-epoch lists (`epoch_batches`), identical on
    every rank. Micro-batch m of rank r in update u is global batch (u * accum + m) * world + r, so ranks
    take disjoint batches, and a run resumed at update `start` continues mid-epoch with the same order.
    """

    def __init__(self, buckets_of: Sequence[int], batch: int, seed: int, rank: int = 0, world: int = 1,
                 accum: int = 1, start: int = 0) -> None:
        self.buckets_of, self.batch, self.seed = list(buckets_of), batch, seed
        self.rank, self.world, self.accum, self.update = rank, world, accum, start
        self.per_epoch = len(epoch_batches(self.buckets_of, batch, seed, 0))
        if self.per_epoch == 0:
            counts = np.bincount(self.buckets_of) if self.buckets_of else np.zeros(1, dtype=int)
            raise InputError(f"data.buckets: no bucket holds train.batch_size={batch} images (the fullest holds "
                             f"{int(counts.max())}); use fewer buckets or a smaller batch")
        self._epoch, self._list = -1, []

    def batch_at(self, index: int) -> list[int]:
        epoch, j = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._list = epoch, epoch_batches(self.buckets_of, self.batch, self.seed, epoch)
        return self._list[j]

    def indices(self, update: int, micro: int) -> list[int]:
        return self.batch_at((update * self.accum + micro) * self.world + self.rank)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            for m in range(self.accum):
                yield self.indices(self.update, m)
            self.update += 1
