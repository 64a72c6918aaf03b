"""Cached text embeddings: encode each caption once, then train with the text encoders off the GPU.

This is the first section of the prepare cache (`flashdmd data prepare`), not a format of its
own. One cache folder belongs to one model identity and holds content-addressed sections:

    CACHE/
      manifest.json                  {"format": "flashdmd-cache", "version": 1,
                                      "model": {"key", "teacher", "family"},
                                      "text": {"recipe", "fields", "shards": {file: count},
                                               "entries": {entry_key: file}}}
      text/shard-00000.safetensors   tensors "<entry_key>.embeds" [L, D], "<entry_key>.pooled" [P]
      (`flashdmd data prepare` adds a "latents" section and latents/ shards: trainer/datacache.py)

- `model.key` hashes what the embeddings depend on: the family, the encoding recipe, each text encoder's
  config and a sample of its weights, and the tokenizers. A cache made for another teacher (or a fine-tune
  of the same architecture) has another key and is refused with a clear error, never silently reused.
- `entry_key` = sha256(model key, recipe, caption): content-addressed, so a dataset that grows only encodes
  its new captions, into a new shard. Shards are written to a temporary name and renamed, then the manifest
  is replaced the same way, so a crash leaves a readable cache (at worst an unlisted shard).
- time_ids (SDXL micro-conditioning) are not cached here: they come from the resolution, or, with
  aspect-ratio buckets, from each image (trainer/buckets.py; stored in the latents shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from trainer.errors import InputError
from trainer.models import Cond, Teacher
from trainer.toy.prompts import digit_prompt

FORMAT, VERSION = "flashdmd-cache", 1
# How Teacher.encode builds the conditioning (DESIGN §4: SDXL = penultimate states of both encoders
# concatenated + pooled text_embeds); bump it when that code changes, so older caches are refused.
TEXT_RECIPE = "teacher.encode/v1"
ENCODE_BATCH = 64
_SAMPLE = 256  # weight values hashed from each end of every tensor: fast, and different for any fine-tune


def _update_config(h: Any, config: Any) -> None:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # Paths, versions and the load dtype do not change the network.
    d = {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version", "torch_dtype",
                                                                            "dtype")}
    h.update(json.dumps(d, sort_keys=True, default=str).encode())


def text_encoder_key(teacher: Teacher) -> str:
    """The identity of the teacher's text conditioning: family, recipe, encoder configs, weights, tokenizers."""
    h = hashlib.sha256(f"{FORMAT}/{VERSION}|{teacher.family}|{TEXT_RECIPE}".encode())
    for enc in teacher.text_encoders():
        _update_config(h, enc.config)
        for name, t in sorted(enc.state_dict().items()):
            flat = t.detach().flatten()
            sample = torch.cat([flat[:_SAMPLE], flat[-_SAMPLE:]]).float().cpu()
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(sample.numpy().tobytes())
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(teacher.pipe, name, None)
        if tok is not None:
            vocab = sorted(tok.get_vocab().items())
            h.update(json.dumps([name, tok.model_max_length, vocab]).encode())
    return h.hexdigest()


def entry_key(model_key: str, caption: str, recipe: str = TEXT_RECIPE) -> str:
    return hashlib.sha256(f"{model_key}\0{recipe}\0{caption}".encode()).hexdigest()[:40]


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class TextCache:
    """A cache folder opened for one model key; read with `get`, grown with `add`."""

    def __init__(self, root: str | Path, model_key: str, teacher_ref: str = "", family: str = "",
                 field: str = "memory.cache_dir") -> None:
        self.root = Path(root).expanduser()
        self.model_key = model_key
        self.manifest_path = self.root / "manifest.json"
        if self.manifest_path.is_file():
            self.manifest = json.loads(self.manifest_path.read_text())
            if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
                raise InputError(f"{field}: {self.root} is not a {FORMAT} v{VERSION} cache")
            other = self.manifest["model"]
            if other["key"] != model_key:
                raise InputError(
                    f"{field}: {self.root} was made for another model ({other.get('teacher')!r}, "
                    f"{other.get('family')}, key {other['key'][:12]}…), not this teacher ({teacher_ref!r}, key "
                    f"{model_key[:12]}…); point {field} at a fresh folder")
        else:
            self.manifest = {"format": FORMAT, "version": VERSION,
                             "model": {"key": model_key, "teacher": teacher_ref, "family": family}}
        self.manifest.setdefault("text", {"recipe": TEXT_RECIPE, "fields": [], "shards": {}, "entries": {}})
        if self.manifest["text"]["recipe"] != TEXT_RECIPE:
            raise InputError(f"{field}: {self.root} holds text made by {self.manifest['text']['recipe']}, "
                             f"this trainer makes {TEXT_RECIPE}; point {field} at a fresh folder")
        self._open: dict[str, Any] = {}

    @property
    def entries(self) -> dict[str, str]:
        return self.manifest["text"]["entries"]

    def __len__(self) -> int:
        return len(self.entries)

    def missing(self, captions: Iterable[str]) -> list[str]:
        return [c for c in dict.fromkeys(captions) if entry_key(self.model_key, c) not in self.entries]

    def add(self, captions: Sequence[str], conds: Cond) -> Path:
        """Write one new shard with the given captions' embeddings (conds: a batch, row i = captions[i])."""
        shard = self.next_shard()
        self.write_shard(shard, captions, conds)
        self.register([(shard, list(captions))])
        return self.root / shard

    def next_shard(self, offset: int = 0) -> str:
        """The name of the shard `offset` places after the last one listed (every rank computes the same)."""
        return f"text/shard-{len(self.manifest['text']['shards']) + offset:05d}.safetensors"

    def write_shard(self, shard: str, captions: Sequence[str], conds: Cond, rank: int = 0) -> None:
        """Write a shard file, without listing it: ranks write theirs in parallel, one rank lists them all."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        fields = {"embeds": conds.embeds, "pooled": conds.pooled}
        for i, c in enumerate(captions):
            key = entry_key(self.model_key, c)
            for name, value in fields.items():
                if value is not None:
                    tensors[f"{key}.{name}"] = value[i].detach().to("cpu").contiguous()
        (self.root / "text").mkdir(parents=True, exist_ok=True)
        _write_atomic(self.root / shard, lambda tmp: save_file(tensors, str(tmp), metadata={"model": self.model_key,
                                                                                      "rank": str(rank)}))
        self.manifest["text"]["fields"] = [n for n, v in fields.items() if v is not None]

    def register(self, shards: Sequence[tuple[str, list[str]]]) -> None:
        """List written shards (name, captions) in the manifest and replace it atomically."""
        text = self.manifest["text"]
        for shard, captions in shards:
            text["shards"][shard] = len(captions)
            for c in captions:
                self.entries[entry_key(self.model_key, c)] = shard
        _write_atomic(self.manifest_path, lambda tmp: tmp.write_text(json.dumps(self.manifest, indent=1)))

    def reload(self) -> None:
        """Re-read the manifest another rank has just replaced."""
        self.manifest = json.loads(self.manifest_path.read_text())
        self._open.clear()

    def _shard(self, name: str) -> Any:
        if name not in self._open:
            from safetensors import safe_open

            self._open[name] = safe_open(str(self.root / name), framework="pt", device="cpu")
        return self._open[name]

    def get(self, captions: Sequence[str]) -> dict[str, Tensor] | None:
        """{"embeds": [B, L, D], "pooled": [B, P]} on the CPU, or None if any caption is not cached."""
        keys = [entry_key(self.model_key, c) for c in captions]
        if any(k not in self.entries for k in keys):
            return None
        out: dict[str, list[Tensor]] = {f: [] for f in self.manifest["text"]["fields"]}
        for k in keys:
            shard = self._shard(self.entries[k])
            for f, rows in out.items():
                rows.append(shard.get_tensor(f"{k}.{f}"))
        return {f: torch.stack(rows) for f, rows in out.items()}


def dataset_captions(ds: Any) -> list[str]:
    """Every caption of a trainer.data dataset, without reading its images."""
    if hasattr(ds, "prompts"):  # PromptDataset
        return list(ds.prompts)
    if hasattr(ds, "items"):  # PairDataset: (path, caption)
        return [c for _, c in ds.items]
    if hasattr(ds, "labels"):  # DigitsDataset
        return [digit_prompt(int(lbl)) for lbl in ds.labels]
    return [ds[i]["caption"] for i in range(len(ds))]


def build_text_cache(teacher: Teacher, captions: Iterable[str], root: str | Path,
                     batch: int = ENCODE_BATCH, rank: int = 0, world: int = 1) -> TextCache:
    """Open (or create) the cache at `root` for this teacher and encode the captions it lacks.

    The empty prompt is always included: it is the unconditional input of CFG. With several ranks
    (`rank` of `world`), every rank calls this with the same captions: the missing ones are cut into chunks
    of `batch`, rank r encodes and writes chunks r, r + world, ..., and rank 0 lists them all once every
    rank has written (`startup_barrier`), so the cache reads the same as one written by a single process.
    """
    from trainer.parallel import startup_barrier

    cache = TextCache(root, text_encoder_key(teacher), teacher.ref, teacher.family)
    todo = cache.missing(["", *captions])
    chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    if world == 1:
        for chunk in chunks:
            cache.add(chunk, teacher.encode(chunk))
        return cache
    for i in range(rank, len(chunks), world):
        cache.write_shard(cache.next_shard(i), chunks[i], teacher.encode(chunks[i]), rank)
    startup_barrier("encoding their part of the captions")
    if rank == 0 and chunks:  # chunk 0 is rank 0's, so its write_shard set the manifest's fields
        cache.register([(cache.next_shard(i), chunk) for i, chunk in enumerate(chunks)])
    startup_barrier("listing the encoded captions")
    cache.reload()
    return cache


def _encode_cached(self: Teacher, prompts: list[str]) -> Cond:
    """Teacher.encode from the cache; a caption that is not cached is encoded on the CPU."""
    cache: TextCache = self._text_cache
    got = cache.get(prompts)
    if got is None:
        # Teacher.encode reads the device from `self`: run it on a CPU view of the same pipeline.
        cpu = types.SimpleNamespace(family=self.family, pipe=self.pipe, device=torch.device("cpu"),
                                    time_ids=lambda n: self.time_ids(n).cpu())
        self.text_cache_misses += len(cache.missing(prompts))
        return Teacher.encode(cpu, list(prompts)).map(lambda v: v.to(self.device))  # type: ignore[arg-type]
    dev = self.device
    pooled = got.get("pooled")
    return Cond(got["embeds"].to(dev), None if pooled is None else pooled.to(dev),
                self.time_ids(len(prompts)) if self.family == "sdxl" else None)


def use_text_cache(teacher: Teacher, cache: TextCache) -> None:
    """Route `teacher.encode` through the cache and move the text encoders to the CPU (memory.text_cache).

    Patched on the instance, so every caller (the Distiller, stage 2, sample grids) reads the cache.
    """
    teacher._text_cache = cache  # type: ignore[attr-defined]
    teacher.text_cache_misses = 0  # type: ignore[attr-defined]
    teacher.encode = types.MethodType(_encode_cached, teacher)  # type: ignore[method-assign]
    for enc in teacher.text_encoders():
        enc.to("cpu")
    teacher._uncond = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_text_cache(cfg: Any, teacher: Teacher, ds: Any, run_dir: str | Path, accelerator: Any,
                       extra: Sequence[str] = ()) -> TextCache | None:
    """The trainer's entry: with memory.text_cache on, build (every rank encodes its part) and attach the cache.

    `extra`: captions that are not in the dataset but are encoded all run long (the validation prompts).
    """
    if not cfg.memory.text_cache:
        return None
    root = Path(cfg.memory.cache_dir or Path(run_dir) / "cache")
    cache = build_text_cache(teacher, [*dataset_captions(ds), *extra], root, rank=accelerator.process_index,
                             world=accelerator.num_processes)
    use_text_cache(teacher, cache)
    return cache
