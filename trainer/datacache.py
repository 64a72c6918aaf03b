"""The prepare cache: VAE latents, pixels and SDXL size/crop ids beside trainer/textcache.py's text.

    CACHE/manifest.json   TextCache's manifest ("model", "text") plus
        "latents": {"teacher": {"ref", "key"}, "preprocess": {...}, "source": str, "consumed": int,
                    "shards": {file: {"count", "start", "end"}}, "skipped": [[key, reason], ...]}
    CACHE/latents/shard-00000.safetensors
        "moments.<j>" [2C, h, w]  the VAE posterior (mean, logvar): training still samples it every step
        "pixels.<j>"  [3, H, W]   uint8, what the Pixel-GAN discriminator sees as the real image
        "time_ids"    [n, 6]      (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
        "bucket"      [n]
        metadata: "keys", "captions" (JSON lists)

`latents.teacher.key` hashes the teacher's reference and every component's config plus a sample of the VAE's
weights; `preprocess` is the resolution, the bucket list, the crop mode and (random crops) the seed. A training
spec whose teacher or preprocessing differs is refused, naming data.cache. Shards cover consecutive source
positions [start, end): a crashed prepare keeps its finished shards and resumes at `consumed`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from trainer.buckets import to_float
from trainer.errors import InputError
from trainer.models import Teacher
from trainer.textcache import TextCache, _update_config, _write_atomic, text_encoder_key

RECIPE = "prepare/v1"  # bump when fit() or the stored fields change, so older caches are refused
_SAMPLE = 256


def teacher_key(teacher: Teacher) -> str:
    """The teacher's identity for cached latents: its reference, every component config, the VAE's weights."""
    h = hashlib.sha256(f"{RECIPE}|{teacher.family}|{teacher.ref}".encode())
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"):
        comp = getattr(teacher.pipe, name, None)
        if comp is not None:
            h.update(name.encode())
            _update_config(h, comp.config)
    for name, t in sorted(teacher.vae.state_dict().items()):
        flat = t.detach().flatten()
        h.update(name.encode())
        h.update(torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()


def preprocess_of(resolution: int, buckets: list[tuple[int, int]] | None, crop: str, seed: int) -> dict:
    """What the cached tensors depend on besides the teacher. Without buckets: one square at the resolution."""
    return {"recipe": RECIPE, "resolution": int(resolution),
            "buckets": None if buckets is None else [[int(h), int(w)] for h, w in buckets],
            "crop": crop, "seed": int(seed) if crop == "random" else None}


def _diff(a: dict, b: dict) -> str:
    return ", ".join(f"{k}={a.get(k)!r} (this spec: {b.get(k)!r})" for k in sorted(set(a) | set(b))
                     if a.get(k) != b.get(k))


class DataCache:
    """A prepare cache opened for one teacher and one preprocessing (created if absent)."""

    def __init__(self, root: str | Path, teacher: Teacher, preprocess: dict, *, create: bool,
                 field: str = "data.cache") -> None:
        self.root = Path(root).expanduser()
        if not create and not (self.root / "manifest.json").is_file():
            raise InputError(f"{field}: {self.root} is not a prepared cache (no manifest.json); make one with "
                             "`flashdmd data prepare SOURCE -o CACHE`")
        self.text = TextCache(self.root, text_encoder_key(teacher), teacher.ref, teacher.family, field=field)
        key = teacher_key(teacher)
        lat = self.text.manifest.get("latents")
        if lat is None:
            if not create:
                raise InputError(f"{field}: {self.root} holds no latents; run `flashdmd data prepare` into it")
            lat = {"teacher": {"ref": teacher.ref, "key": key}, "preprocess": preprocess, "source": "",
                   "consumed": 0, "shards": {}, "skipped": []}
            self.text.manifest["latents"] = lat
        elif lat["teacher"]["key"] != key:
            raise InputError(f"{field}: {self.root} was prepared for another teacher ({lat['teacher']['ref']!r}, key "
                             f"{lat['teacher']['key'][:12]}…), not {teacher.ref!r} (key {key[:12]}…); run "
                             "`flashdmd data prepare` for this teacher into a fresh folder")
        elif lat["preprocess"] != preprocess:
            raise InputError(f"{field}: {self.root} was prepared with other preprocessing: "
                             f"{_diff(lat['preprocess'], preprocess)}; match model.resolution and data.buckets "
                             "to the prepare options, or prepare again")
        self.latents = lat

    @property
    def manifest(self) -> dict:
        return self.text.manifest

    def write_manifest(self) -> None:
        _write_atomic(self.root / "manifest.json",
                      lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=1)))

    def add_shard(self, tensors: dict[str, torch.Tensor], keys: list[str], captions: list[str], start: int,
                  end: int, skipped: list[tuple[str, str]]) -> Path:
        """Write one latents shard (atomically), then record it, its source span and its skipped images."""
        from safetensors.torch import save_file

        name = f"latents/shard-{len(self.latents['shards']):05d}.safetensors"
        (self.root / "latents").mkdir(parents=True, exist_ok=True)
        meta = {"keys": json.dumps(keys), "captions": json.dumps(captions)}
        _write_atomic(self.root / name, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        self.latents["shards"][name] = {"count": len(keys), "start": start, "end": end}
        self.latents["consumed"] = end
        self.latents["skipped"] += [list(s) for s in skipped]
        self.write_manifest()
        return self.root / name


class CacheDataset(Dataset):
    """Training samples from a prepare cache: {"image", "moments", "caption"[, "time_ids"]}.

    With buckets, `buckets_of` makes trainer.data.sharded_batches draw each batch from one bucket, and
    time_ids carry SDXL's per-sample size/crop conditioning; without, every sample is the square resolution.
    """

    def __init__(self, root: str | Path) -> None:
        from safetensors import safe_open

        self.root = Path(root).expanduser()
        path = self.root / "manifest.json"
        if not path.is_file():
            raise InputError(f"data.cache: {self.root} is not a prepared cache (no manifest.json); make one with "
                             "`flashdmd data prepare SOURCE -o CACHE`")
        lat = json.loads(path.read_text()).get("latents")
        if not lat or not lat["shards"]:
            raise InputError(f"data.cache: {self.root} holds no prepared images")
        self.preprocess = lat["preprocess"]
        self.bucketed = self.preprocess["buckets"] is not None
        self.index: list[tuple[str, int]] = []
        self.captions: list[str] = []
        self.time_ids: list[torch.Tensor] = []
        buckets: list[int] = []
        for name in lat["shards"]:
            # A manifest is data too: its shard names must stay inside the cache folder.
            if not (self.root / name).resolve().is_relative_to(self.root.resolve()):
                raise InputError(f"data.cache: {self.root}: shard {name!r} lies outside the cache folder")
            with safe_open(str(self.root / name), framework="pt") as f:
                meta = f.metadata()
                n = len(json.loads(meta["keys"]))
                self.captions += json.loads(meta["captions"])
                self.time_ids += list(f.get_tensor("time_ids"))
                buckets += f.get_tensor("bucket").tolist()
            self.index += [(name, j) for j in range(n)]
        if self.bucketed:
            self.buckets_of = buckets
        self.prompts = self.captions  # trainer.textcache.dataset_captions reads this
        self._open: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _shard(self, name: str) -> Any:
        if name not in self._open:  # opened lazily, so each DataLoader worker opens its own handles
            from safetensors import safe_open

            self._open[name] = safe_open(str(self.root / name), framework="pt")
        return self._open[name]

    def __getitem__(self, i: int) -> dict:
        name, j = self.index[i]
        f = self._shard(name)
        item = {"image": to_float(f.get_tensor(f"pixels.{j}")), "moments": f.get_tensor(f"moments.{j}"),
                "caption": self.captions[i]}
        if self.bucketed:
            item["time_ids"] = self.time_ids[i]
        return item


def attach_cache(ds: CacheDataset, teacher: Teacher, preprocess: dict) -> DataCache:
    """The trainer's check and hook-up: refuse another teacher's or preprocessing's cache (naming
    data.cache), then route teacher.encode through its text embeddings."""
    from trainer.textcache import use_text_cache

    cache = DataCache(ds.root, teacher, preprocess, create=False)
    missing = cache.text.missing(["", *ds.captions])
    if missing:
        raise InputError(f"data.cache: {ds.root} lacks the text embeddings of {len(missing)} caption(s), e.g. "
                         f"{missing[0]!r}; run `flashdmd data prepare` again to finish it")
    use_text_cache(teacher, cache.text)
    return cache
