"""`flashdmd data prepare SOURCE -o CACHE`: the command-line face of trainer/prepare.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


@click.group("data")
def data_group() -> None:
    """Training data: encode a source once into a latent + text-embedding cache (`data.cache`)."""


@data_group.command("prepare")
@click.argument("source")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="the cache folder (an unfinished one is resumed)")
@click.option("--teacher", required=True, help="hub id, diffusers folder or tiny:<family> (the training spec's "
              "model.teacher)")
@click.option("--resolution", type=int, default=None, help="model.resolution (default: the teacher's)")
@click.option("--buckets", "bucket_mode", type=click.Choice(["off", "sdxl", "derived"]), default="off",
              show_default=True, help="aspect-ratio buckets: SDXL's list, or derived from --target-pixels")
@click.option("--target-pixels", type=int, default=None, help="derived buckets: pixels per bucket "
              "(default: resolution squared)")
@click.option("--step", type=int, default=64, show_default=True, help="derived buckets: side multiple")
@click.option("--crop", type=click.Choice(["center", "random"]), default="center", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="random crops: the training train.seed")
@click.option("--batch-size", type=int, default=16, show_default=True, help="images per VAE call")
@click.option("--shard-size", type=int, default=1024, show_default=True, help="source images per shard")
def prepare_command(source: str, output: Path, teacher: str, resolution: int | None, bucket_mode: str,
                    target_pixels: int | None, step: int, crop: str, seed: int, batch_size: int,
                    shard_size: int) -> None:
    """Encode SOURCE's images (VAE latents, size/crop ids) and captions (text embeddings) into OUTPUT.

    SOURCE: an image folder with .txt captions, a .jsonl, webdataset .tar shards (folder, glob or brace
    pattern), a datasets save_to_disk folder or .parquet files. Train from it with `data.cache: OUTPUT` and
    the same model.resolution and data.buckets.
    """
    from trainer.jobspec import SpecError, parse_spec

    buckets: dict = {"enabled": bucket_mode != "off", "step": step, "crop": crop, "target_pixels": target_pixels}
    if bucket_mode == "sdxl":
        buckets["sizes"] = "sdxl"
    raw = {"kind": "prepare", "model": {"teacher": teacher, "resolution": resolution},
           "prepare": {"source": source, "output": str(output), "buckets": buckets, "seed": seed,
                       "batch_size": batch_size, "shard_size": shard_size}}
    try:
        cfg = parse_spec(raw)
    except SpecError as err:
        raise click.ClickException(str(err)) from None
    from trainer.data import resolve_buckets
    from trainer.errors import InputError
    from trainer.models import load_teacher
    from trainer.prepare import prepare

    try:
        import torch

        t = load_teacher(cfg.model, "cuda" if torch.cuda.is_available() else "cpu")
        p = cfg.prepare
        sizes = resolve_buckets(p.buckets, t.resolution) if p.buckets.enabled else None
        res = prepare(source, output, t, buckets=sizes, crop=crop, seed=seed, batch=batch_size,
                      shard_size=shard_size)
    except InputError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(json.dumps({"cache": str(res.root), "images": res.total, "written": res.written,
                           "skipped": len(res.skipped), "images_per_s": round(res.images_per_s, 2)}))
    for key, why in res.skipped:
        click.echo(f"skipped {key}: {why}", err=True)
