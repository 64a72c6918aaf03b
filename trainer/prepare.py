"""`flashdmd data prepare SOURCE -o CACHE`: encode a source's images and captions once.

Every image is fitted to its bucket (trainer/buckets.py), encoded by the teacher's VAE into its posterior
parameters, and stored with its uint8 pixels and SDXL size/crop ids; every caption is encoded by the text
encoders into the cache's text section (trainer/textcache.py). The work is cut into shards of `shard_size`
source positions: a finished shard is never redone, so a crashed prepare resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.buckets import Size, assign, fit, to_float, to_uint8
from trainer.datacache import DataCache, preprocess_of
from trainer.jobspec import PrepareJob
from trainer.models import Teacher
from trainer.sink import Sink
from trainer.sources import Report, Sample, open_source

ENCODE_BATCH = 16
SHARD_SIZE = 1024


@dataclass
class PrepareResult:
    root: Path
    written: int  # images encoded by this call
    total: int  # images in the cache
    skipped: list[tuple[str, str]]  # skipped by this call
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


def _encode_shard(teacher: Teacher, samples: list[Sample], sizes: list[Size], crop: str, seed: int,
                  batch: int) -> dict[str, torch.Tensor]:
    """Fit, group by bucket, VAE-encode in batches; rows keep the samples' order."""
    fitted = [fit(s.image, sizes[assign((s.image.height, s.image.width), sizes)], crop, seed, s.key)
              for s in samples]
    pixels = [to_uint8(f.image) for f in fitted]
    out: dict[str, torch.Tensor] = {}
    by_size: dict[Size, list[int]] = {}
    for j, f in enumerate(fitted):
        by_size.setdefault(f.target, []).append(j)
    for rows in by_size.values():
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            images = to_float(torch.stack([pixels[j] for j in chunk])).to(teacher.device)
            moments = teacher.encode_moments(images).float().cpu()
            for j, m in zip(chunk, moments, strict=True):
                out[f"moments.{j}"] = m.contiguous()
    for j, p in enumerate(pixels):
        out[f"pixels.{j}"] = p
    out["time_ids"] = torch.tensor([f.time_ids for f in fitted], dtype=torch.float32).reshape(-1, 6)
    out["bucket"] = torch.tensor([sizes.index(f.target) for f in fitted], dtype=torch.long)
    return out


def prepare(source: str, out: str | Path, teacher: Teacher, *, buckets: list[Size] | None, crop: str = "center",
            seed: int = 0, batch: int = ENCODE_BATCH, shard_size: int = SHARD_SIZE, limit: int | None = None,
            progress: bool = True) -> PrepareResult:
    """Encode `source` into the cache at `out` for this teacher; resumes an unfinished cache.

    limit: stop after this many source positions (tests simulate a crash with it).
    """
    src = open_source(source)
    sizes = buckets or [(teacher.resolution, teacher.resolution)]
    cache = DataCache(out, teacher, preprocess_of(teacher.resolution, buckets, crop, seed), create=True,
                      field="data prepare -o")
    cache.latents["source"] = str(source)
    start = int(cache.latents["consumed"])
    report, pending, shard_start = Report(), [], start
    written, flushed_skips, t0 = 0, 0, time.perf_counter()
    total = sum(len(s) for s in src.shards) if hasattr(src, "root") or hasattr(src, "base") else None
    bar = tqdm(total=total, initial=start, unit="img", desc="prepare", disable=not progress, dynamic_ncols=True)

    def flush(end: int) -> None:
        nonlocal pending, shard_start, written, flushed_skips
        if end <= shard_start:
            return
        captions = [s.caption for s in pending]
        todo = cache.text.missing(["", *captions])
        for i in range(0, len(todo), batch * 4):  # text first: a shard is only listed once its text exists
            cache.text.add(todo[i:i + batch * 4], teacher.encode(todo[i:i + batch * 4]))
        tensors = _encode_shard(teacher, pending, sizes, crop, seed, batch) if pending else {
            "time_ids": torch.zeros(0, 6), "bucket": torch.zeros(0, dtype=torch.long)}
        cache.add_shard(tensors, [s.key for s in pending], captions, shard_start, end,
                        report.skipped[flushed_skips:])
        flushed_skips = len(report.skipped)
        written += len(pending)
        pending, shard_start = [], end

    seen_end = start
    for sample in src.stream(start=start, report=report):
        if limit is not None and sample.position >= limit:
            break
        pending.append(sample)
        seen_end = sample.position + 1
        bar.update(seen_end - bar.n)
        rate = (written + len(pending)) / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix({"img/s": f"{rate:.1f}", "skipped": len(report.skipped)})
        if seen_end - shard_start >= shard_size:
            flush(seen_end)
    else:
        seen_end = start + report.seen  # the stream ended: skipped images at its tail belong to the last shard
    flush(seen_end)
    bar.close()
    total_images = sum(s["count"] for s in cache.latents["shards"].values())
    return PrepareResult(cache.root, written, total_images, report.skipped, time.perf_counter() - t0)


def run_prepare(cfg: PrepareJob, sink: Sink, *, run_dir: str | Path, resume: bool = False) -> int:
    """The `kind: prepare` job (flashjob/cli.py run_job): prepare into prepare.output or RUN_DIR/cache.

    A prepare always resumes an unfinished cache (finished shards are kept), so `resume` changes nothing.
    """
    from trainer.data import resolve_buckets
    from trainer.models import load_teacher

    p = cfg.prepare
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_teacher(cfg.model, device)
    buckets = resolve_buckets(p.buckets, teacher.resolution) if p.buckets.enabled else None
    out = Path(p.output).expanduser() if p.output else Path(run_dir) / "cache"
    sink.log_event("started", f"prepare {p.source} -> {out}", step=0, source=p.source, output=str(out))
    res = prepare(p.source, out, teacher, buckets=buckets, crop=p.buckets.crop, seed=p.seed,
                  batch=p.batch_size, shard_size=p.shard_size)
    if res.skipped:
        sink.log_event("data_skipped", f"{len(res.skipped)} unreadable image(s) skipped, e.g. {res.skipped[0][0]}",
                       count=len(res.skipped), examples=[list(s) for s in res.skipped[:20]])
    sink.log_metrics(1, {"prepare/images": float(res.total), "prepare/written": float(res.written),
                         "prepare/skipped": float(len(res.skipped)), "prepare/images_per_s": res.images_per_s})
    sink.log_event("finished", f"prepared {res.total} images into {out} ({len(res.skipped)} skipped)", step=1,
                   cache=str(out))
    return 1
