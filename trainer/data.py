"""Training data: image folder + .txt captions, JSONL manifest, prompts file, built-in digits.

Every source yields {"image": [3, R, R] in [-1, 1] or absent, "caption": str}.
Real images feed the discriminator; captions condition the generator.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from trainer.buckets import (
    SDXL_BUCKETS,
    BucketBatchSampler,
    Size,
    assign,
    derive_buckets,
    fit,
    to_float,
    to_uint8,
)
from trainer.errors import InputError
from trainer.jobspec import BucketSpec, DataSpec
from trainer.roots import check_data_file, check_opened
from trainer.toy.prompts import digit_prompt

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def to_tensor(img: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """PIL -> [3, R, R] float in [-1, 1]: resize the short side, then centre-crop (or squash)."""
    img = img.convert("RGB")
    if center_crop:
        w, h = img.size
        s = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    else:
        img = img.resize((resolution, resolution), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class PairDataset(Dataset):
    def __init__(self, items: list[tuple[Path, str]], resolution: int, center_crop: bool, flip: bool) -> None:
        self.items, self.resolution, self.center_crop, self.flip = items, resolution, center_crop, flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, caption = self.items[i]
        with Image.open(path) as img:
            x = to_tensor(img, self.resolution, self.center_crop)
        if self.flip and random.random() < 0.5:
            x = x.flip(-1)
        return {"image": x, "caption": caption}


def resolve_buckets(spec: BucketSpec, resolution: int) -> list[Size]:
    """The bucket sizes of a spec: SDXL's list, the given list, or derived from the pixel budget."""
    if spec.sizes == "sdxl":
        return list(SDXL_BUCKETS)
    if spec.sizes:
        return [(int(h), int(w)) for h, w in spec.sizes]
    return derive_buckets(spec.target_pixels or resolution * resolution, spec.step)


def image_size(path: Path) -> Size | None:
    """(height, width) from the header, or None for a file PIL cannot read (skipped and counted)."""
    try:
        with Image.open(path) as img:
            img.verify()  # parses the whole structure PIL knows how to check, without decoding pixels
            return img.size[1], img.size[0]
    except Exception:  # PIL raises many types for damaged files; any of them means "skip it"
        return None


class BucketDataset(Dataset):
    """Images resized-to-cover and cropped to their aspect-ratio bucket, with SDXL's size/crop time_ids.

    `buckets_of[i]` is item i's bucket: trainer.data.sharded_batches then draws each batch from one bucket.
    Unreadable images are dropped when the dataset is built and counted in `skipped`.
    """

    def __init__(self, items: list[tuple[Path, str]], sizes: list[Size], crop: str, seed: int,
                 root: Path | None = None) -> None:
        self.sizes, self.crop, self.seed = sizes, crop, seed
        self.items: list[tuple[Path, str]] = []
        self.keys: list[str] = []
        self.buckets_of: list[int] = []
        self.skipped: list[str] = []
        for path, caption in items:
            hw = image_size(path)
            if hw is None:
                self.skipped.append(str(path))
                continue
            self.items.append((path, caption))
            self.keys.append(sample_key(path, root))
            self.buckets_of.append(assign(hw, sizes))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, caption = self.items[i]
        with Image.open(path) as img:
            f = fit(img, self.sizes[self.buckets_of[i]], self.crop, self.seed, self.keys[i])
        return {"image": to_float(to_uint8(f.image)), "caption": caption,
                "time_ids": torch.tensor(f.time_ids), "bucket": self.buckets_of[i]}


def sample_key(path: Path, root: Path | None) -> str:
    """A sample's key: its path relative to the source (what seeds a random crop, in training and prepare)."""
    try:
        return path.relative_to(root).as_posix() if root is not None else path.name
    except ValueError:
        return path.as_posix()


class PromptDataset(Dataset):
    def __init__(self, prompts: list[str]) -> None:
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"caption": self.prompts[i]}


def digits_split(labels: Sequence[int], seed: int = 0, test_frac: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices of the 1797 digits: one stratified split, fixed by `seed`. The digits evaluator
    trains on the train part and the held-out part is the FD reference, so no scored real digit was seen by the
    evaluator or by a GAN reading `builtin: digits-train`."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_frac, random_state=seed, stratify=np.asarray(labels))
    return np.sort(tr), np.sort(te)


class DigitsDataset(Dataset):
    """sklearn's 8x8 digits (1797 images, shipped in the package), upsampled to R x R RGB; split="train" keeps
    only `digits_split`'s train part."""

    def __init__(self, resolution: int, split: str | None = None) -> None:
        from sklearn.datasets import load_digits

        if split not in (None, "train"):
            raise ValueError(f"DigitsDataset split: expected None or 'train', got {split!r}")
        digits = load_digits()
        images, labels = digits.images, digits.target
        if split == "train":
            keep = digits_split(labels.tolist())[0]
            images, labels = images[keep], labels[keep]
        # Kept at 8x8 and upsampled per item: all 1797 images at 1024^2 would take 22 GB.
        self.small = torch.from_numpy(images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
        self.resolution = resolution
        self.labels = labels.tolist()

    def image(self, i: int) -> torch.Tensor:
        img = torch.nn.functional.interpolate(self.small[i:i + 1], size=(self.resolution, self.resolution),
                                              mode="bilinear", align_corners=False)[0]
        return (img.clamp(0, 1) * 2 - 1).expand(3, -1, -1).contiguous()  # [3, R, R]

    @property
    def images(self) -> torch.Tensor:
        """All images [N, 3, R, R] (for evaluation code at small resolutions)."""
        return torch.stack([self.image(i) for i in range(len(self))])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image(i), "caption": digit_prompt(self.labels[i]), "label": self.labels[i]}


def _image_folder(root: Path) -> list[tuple[Path, str]]:
    items = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS:
            cap = p.with_suffix(".txt")
            check_data_file(p, f"data.images: {p.relative_to(root)}")  # a symlink may lead out of the roots
            items.append((p, cap.read_text().strip() if cap.exists() else ""))
    return items


def _manifest(path: Path) -> list[tuple[Path, str]]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            img = Path(row["image"])
            items.append((img if img.is_absolute() else path.parent / img, str(row.get("caption", ""))))
            check_data_file(items[-1][0], f"data.manifest: {path}:{n}")  # before the existence check below
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise InputError(f"data.manifest: {path}:{n}: expected {{\"image\", \"caption\"}}: {err}") from None
    missing = [str(p) for p, _ in items if not p.exists()]
    if missing:
        raise InputError(f"data.manifest: {len(missing)} image(s) not found, e.g. {missing[0]}")
    return items


def build_dataset(spec: DataSpec, resolution: int, seed: int = 0) -> Dataset:
    # Every path is checked again here, where it is opened (trainer/roots.py), and its realpath is what is read.
    if spec.cache:
        from trainer.datacache import CacheDataset

        return CacheDataset(check_opened(spec.cache, "data.cache", runs_ok=True))
    if spec.builtin in ("digits", "digits-train"):
        return DigitsDataset(resolution, split="train" if spec.builtin == "digits-train" else None)
    if spec.prompts:
        path = check_opened(spec.prompts, "data.prompts")
        if not path.is_file():
            raise InputError(f"data.prompts: no such file: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise InputError(f"data.prompts: {path} has no prompts")
        return PromptDataset(prompts)
    if spec.images:
        root = check_opened(spec.images, "data.images")
        if not root.is_dir():
            raise InputError(f"data.images: no such folder: {root}")
        items = _image_folder(root)
        where = "data.images"
    else:
        path = check_opened(spec.manifest, "data.manifest")
        if not path.is_file():
            raise InputError(f"data.manifest: no such file: {path}")
        items, where, root = _manifest(path), "data.manifest", path.parent
    if not items:
        raise InputError(f"{where}: no images found ({', '.join(sorted(IMAGE_EXTS))})")
    if spec.buckets.enabled:
        ds = BucketDataset(items, resolve_buckets(spec.buckets, resolution), spec.buckets.crop, seed, root)
        if not len(ds):
            raise InputError(f"{where}: none of the {len(items)} images could be read")
        return ds
    return PairDataset(items, resolution, spec.center_crop, spec.random_flip)


def infinite_batches(ds: Dataset, batch_size: int, seed: int, num_workers: int = 0,
                     start_epoch: int = 0) -> Iterator[dict]:
    """Reshuffle every epoch with a seed derived from (seed, epoch) (one process; evaluation helpers)."""
    epoch = start_epoch
    while True:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=len(ds) >= batch_size,
                            generator=g, num_workers=num_workers)
        yield from loader
        epoch += 1


class ShardSampler:
    """Index lists for one rank: disjoint shards of one global order, resumable mid-epoch.

    The global order is the concatenation of per-epoch permutations, each seeded by (seed, epoch), so every
    rank computes the same order. Update u consumes the global positions [u*G, (u+1)*G) with
    G = world * accum * batch; micro-batch m of rank r is the slice starting at (m * world + r) * batch, which
    is also the global sample index that trainer/rng.py keys its noise by. A run resumed at update `start`
    continues at position start*G: the same order, the consumed batches skipped, mid-epoch included.
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int = 0, world: int = 1, accum: int = 1,
                 start: int = 0) -> None:
        if n < 1:
            raise ValueError("empty dataset")
        self.n, self.batch, self.seed, self.rank, self.world, self.accum = n, batch, seed, rank, world, accum
        self.update = start
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def positions(self, update: int, micro: int) -> range:
        first = update * self.world * self.accum * self.batch + (micro * self.world + self.rank) * self.batch
        return range(first, first + self.batch)

    def indices(self, update: int, micro: int) -> list[int]:
        return [int(self.permutation(p // self.n)[p % self.n]) for p in self.positions(update, micro)]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            for m in range(self.accum):
                yield self.indices(self.update, m)
            self.update += 1


def sharded_batches(ds: Dataset, batch: int, seed: int, *, rank: int = 0, world: int = 1, accum: int = 1,
                    start: int = 0, num_workers: int = 0) -> Iterator[list[dict]]:
    """Per update, this rank's `accum` micro-batches (a list of collated dicts), starting at update `start`."""
    buckets_of = getattr(ds, "buckets_of", None)  # bucketed data: every batch from one bucket
    sampler = (ShardSampler(len(ds), batch, seed, rank, world, accum, start) if buckets_of is None
               else BucketBatchSampler(buckets_of, batch, seed, rank, world, accum, start))
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=num_workers)
    it = iter(loader)
    while True:
        yield [next(it) for _ in range(accum)]
