"""Data sources for `flashdmd data prepare`: each yields (key, image, caption), shard by shard.

- an image folder with same-named `.txt` captions;
- a JSONL file of {"image": path, "caption": str};
- webdataset tar shards (a path, a glob or a brace pattern such as `data-{000..127}.tar`): members grouped by
  key, the image from jpg/jpeg/png/webp, the caption from txt (or a json with a caption/text field);
- a Hugging Face `datasets` folder (`save_to_disk`: its .arrow files) or parquet files, with an image column
  (datasets' Image feature: {bytes, path}) and a caption column.

A shard is the unit of distribution: rank r of W streams shards r, r+W, ... (disjoint), in an order that is a
pure function of (seed, epoch), and `start` skips the samples this rank already consumed, so a resumed run
continues mid-epoch. Folder and JSONL sources are cut into shards of SHARD_FILES images. Unreadable images are
skipped and recorded in the `Report`: never fatal, never silent.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from trainer.errors import InputError
from trainer.roots import check_data_file, check_opened

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
IMAGE_COLUMNS = ("image", "jpg", "png", "img")
SHARD_FILES = 1000


@dataclass
class Sample:
    key: str
    image: Image.Image
    caption: str
    position: int  # index in this rank's stream (skipped samples included): resume with start=position + 1


@dataclass
class Report:
    """What a stream read: how many samples, and which were skipped and why."""

    seen: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        head = ", ".join(f"{k} ({why})" for k, why in self.skipped[:5])
        more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        return f"{self.seen} read, {len(self.skipped)} skipped" + (f": {head}{more}" if self.skipped else "")


Raw = tuple[str, Any, str]  # (key, image bytes or a path, caption)


def _decode(data: Any) -> Image.Image:
    """Bytes or a path -> a fully decoded RGB image (load() now, so corruption shows here, not later)."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data)
    img.load()
    return img.convert("RGB")


class Source:
    """A list of shards and a reader for one shard."""

    kind = "?"

    def __init__(self, ref: str, shards: list[Any]) -> None:
        if not shards:
            raise InputError(f"data prepare SOURCE: {ref} has no {self.kind} data")
        self.ref, self.shards = ref, shards

    def read(self, shard: Any) -> Iterator[Raw]:
        raise NotImplementedError

    def shard_order(self, rank: int, world: int, seed: int | None, epoch: int) -> list[Any]:
        order = list(range(len(self.shards)))
        if seed is not None:  # a fresh shard order per epoch, the same on every rank
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        return [self.shards[i] for i in order[rank::world]]

    def stream(self, rank: int = 0, world: int = 1, *, seed: int | None = None, epoch: int = 0, start: int = 0,
               report: Report | None = None) -> Iterator[Sample]:
        """This rank's samples, from position `start` on; unreadable ones go to `report` instead."""
        report = report if report is not None else Report()
        pos = 0
        for shard in self.shard_order(rank, world, seed, epoch):
            for key, data, caption in self.read(shard):
                pos += 1
                if pos <= start:
                    continue
                report.seen += 1
                try:
                    img = _decode(data)
                except Exception as err:  # PIL raises many types for damaged data; all mean "skip it"
                    report.skipped.append((key, f"{type(err).__name__}: {err}"[:200]))
                    continue
                yield Sample(key, img, caption, pos - 1)


class FolderSource(Source):
    kind = "image folder"

    def __init__(self, root: Path) -> None:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        self.root = root
        super().__init__(str(root), [files[i:i + SHARD_FILES] for i in range(0, len(files), SHARD_FILES)])

    def read(self, shard: list[Path]) -> Iterator[Raw]:
        for p in shard:
            check_data_file(p, f"prepare.source: {p.relative_to(self.root)}")  # a symlink may lead out of the roots
            cap = p.with_suffix(".txt")
            yield p.relative_to(self.root).as_posix(), p, cap.read_text().strip() if cap.exists() else ""


class JsonlSource(Source):
    kind = "JSONL"

    def __init__(self, path: Path) -> None:
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    rows.append((str(row["image"]), str(row.get("caption", ""))))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise InputError(f"data prepare SOURCE: {path}:{n}: expected {{\"image\", \"caption\"}}: "
                                     f"{err}") from None
        self.base = path.parent
        super().__init__(str(path), [rows[i:i + SHARD_FILES] for i in range(0, len(rows), SHARD_FILES)])

    def read(self, shard: list[tuple[str, str]]) -> Iterator[Raw]:
        for image, caption in shard:
            p = Path(image) if Path(image).is_absolute() else self.base / image
            check_data_file(p, f"prepare.source: {self.ref}")  # as data.manifest: lines may point anywhere
            yield image, p, caption


class TarSource(Source):
    """webdataset shards: consecutive tar members sharing a key (the name before its first dot) are a sample."""

    kind = "webdataset"

    def read(self, shard: str) -> Iterator[Raw]:
        check_data_file(Path(shard), f"prepare.source: {self.ref}")  # a linked shard may lead out of the roots
        with tarfile.open(shard, "r|*") as tar:  # streaming mode: shards on shared storage are read once
            key, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base, _, ext = name.rpartition("/")[2].partition(".")
                k = f"{name.rpartition('/')[0]}/{base}".lstrip("/")
                if k != key and key is not None:
                    yield from self._sample(shard, key, parts)
                    parts = {}
                key = k
                parts[ext.lower()] = tar.extractfile(member).read()
            if key is not None:
                yield from self._sample(shard, key, parts)

    @staticmethod
    def _sample(shard: str, key: str, parts: dict[str, bytes]) -> Iterator[Raw]:
        image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
        if image is None:
            return  # metadata-only members (e.g. a __key__ without image) are not samples
        caption = parts["txt"].decode("utf-8", "replace").strip() if "txt" in parts else ""
        if not caption and "json" in parts:
            meta = json.loads(parts["json"])
            caption = str(next((meta[c] for c in CAPTION_COLUMNS if c in meta), ""))
        yield f"{Path(shard).name}/{key}", image, caption


class ArrowSource(Source):
    """A `datasets` save_to_disk folder (.arrow stream files) or parquet files, read in record batches."""

    kind = "datasets/parquet"

    def read(self, shard: str) -> Iterator[Raw]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        check_data_file(Path(shard), f"prepare.source: {self.ref}")
        if shard.endswith(".parquet"):
            batches = pq.ParquetFile(shard).iter_batches(batch_size=256)
        else:
            batches = iter(pa.ipc.open_stream(pa.memory_map(shard)))
        row = 0
        for rb in batches:
            cols = rb.schema.names
            img_col = next((c for c in IMAGE_COLUMNS if c in cols), None)
            cap_col = next((c for c in CAPTION_COLUMNS if c in cols), None)
            if img_col is None:
                raise InputError(f"data prepare SOURCE: {shard} has no image column ({', '.join(IMAGE_COLUMNS)})")
            for rec in rb.to_pylist():
                value = rec[img_col]
                data = value.get("bytes") or value.get("path") if isinstance(value, dict) else value
                if isinstance(data, str):  # an image stored by path, not bytes: it must stay inside the roots
                    check_data_file(Path(data), f"prepare.source: {shard}")
                yield f"{Path(shard).name}/{row}", data, str(rec[cap_col]) if cap_col else ""
                row += 1


def _expand(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand  # installed with webdataset (the [data] extra)
    except ImportError:
        if "{" in pattern:
            raise InputError(f"data prepare SOURCE: {pattern}: brace patterns need `pip install -e '.[data]'`") from None

        def braceexpand(p: str) -> list[str]:
            return [p]

    out: list[str] = []
    for p in braceexpand(pattern):
        out += sorted(glob.glob(str(Path(p).expanduser()))) if any(c in p for c in "*?[") else [p]
    return out


def open_source(ref: str) -> Source:
    """SOURCE -> a Source, by what it names (see the module docstring)."""
    path = check_opened(ref, "prepare.source")  # again, after realpath: its files and lines are checked below
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():  # a DatasetDict: its train split (or its only one)
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
            if split is None:
                raise InputError(f"data prepare SOURCE: {ref} has splits {splits}; name one, e.g. {ref}/{splits[0]}")
            path = path / split
        arrows = sorted(str(p) for p in path.glob("*.arrow"))
        if arrows and ((path / "state.json").is_file() or (path / "dataset_info.json").is_file()):
            return ArrowSource(ref, arrows)
        tars = sorted(str(p) for p in path.glob("*.tar"))
        parquet = sorted(str(p) for p in path.glob("*.parquet"))
        if tars:
            return TarSource(ref, tars)
        if parquet:
            return ArrowSource(ref, parquet)
        return FolderSource(path)
    if path.suffix == ".jsonl" and path.is_file():
        return JsonlSource(path)
    files = _expand(ref)
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise InputError(f"data prepare SOURCE: no such file: {missing[0] if missing else ref}")
    for f in files:
        check_data_file(Path(f), f"prepare.source: {ref}")
    if all(f.endswith(".tar") for f in files):
        return TarSource(ref, files)
    if all(f.endswith((".parquet", ".arrow")) for f in files):
        return ArrowSource(ref, files)
    raise InputError(f"data prepare SOURCE: {ref}: expected a folder, a .jsonl, .tar shards or .parquet files")
