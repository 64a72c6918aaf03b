"""Sample grids from fixed validation prompts and seeds (`train.validation`).

Every image's noise comes from its own seed (trainer/sampling.py draws each image from a
`torch.Generator` seeded with it), so a (prompt, seed, size) cell is the same image whatever
the rank count, the batch it was sampled in, or the other cells of the grid: two runs with the
same validation spec can be compared cell by cell. A grid has one row per prompt and one
column per seed; each size gets its own grid (the first is the `step-N.png` the dashboard
lists, the others `step-N-WxH.png`), and `step-N.json` next to them names every cell.

Without `train.validation` the grid is today's: `train.num_samples` captions spread over the
dataset, image i with seed i, at the training resolution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer.errors import InputError
from trainer.jobspec import TrainSpec
from trainer.jobspec.limits import VALIDATION_MAX_IMAGES, VALIDATION_MAX_PROMPT_CHARS, VALIDATION_MAX_PROMPTS
from trainer.models import Cond, Teacher
from trainer.roots import check_opened
from trainer.sampling import sample, to_uint8
from trainer.schedules import Parameterisation

# Images per sampler call: bounds activation memory for a 256-image grid. The images do not depend on it.
CHUNK = 16


@dataclass(frozen=True)
class Cell:
    prompt: str
    seed: int
    row: int
    col: int


@dataclass(frozen=True)
class ValidationPlan:
    cells: list[Cell]
    cols: int
    sizes: list[tuple[int, int] | None]  # (width, height); None: the training resolution
    guidance: float
    every: int

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.every == 0 or step == max_steps

    @property
    def prompts(self) -> list[str]:
        return [c.prompt for c in self.cells]


def dataset_prompts(ds: Any, n: int) -> list[str]:
    """`n` captions spread evenly over the dataset (the grid without train.validation)."""
    idx = [round(i * (len(ds) - 1) / max(n - 1, 1)) for i in range(n)]
    return [ds[i]["caption"] for i in idx]


def read_prompt_file(path: str) -> list[str]:
    """The prompts of train.validation.file: one per non-empty line, checked against the data roots."""
    file = Path(path).expanduser()
    real = check_opened(file, "train.validation.file")  # the realpath is what gets read
    try:
        lines = real.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"train.validation.file: cannot read {file}: {err}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"train.validation.file: {file} has no prompts (one per line)")
    if len(prompts) > VALIDATION_MAX_PROMPTS:
        raise InputError(f"train.validation.file: {file} has {len(prompts)} prompts; the limit is "
                         f"{VALIDATION_MAX_PROMPTS}")
    long = [i + 1 for i, p in enumerate(prompts) if len(p) > VALIDATION_MAX_PROMPT_CHARS]
    if long:
        raise InputError(f"train.validation.file: prompts {long[:5]} are longer than "
                         f"{VALIDATION_MAX_PROMPT_CHARS} characters")
    return prompts


def _size_multiple(teacher: Teacher) -> int:
    # SD3 patchifies latents 2x2, so its pixel sides are multiples of twice the VAE factor.
    return teacher.vae_scale * (2 if teacher.family == "sd3" else 1)


def plan_validation(train: TrainSpec, ds: Any, teacher: Teacher) -> ValidationPlan:
    """The grid to sample at each validation step; checked here so a bad size fails at start, not at step N."""
    v = train.validation
    if v is None:
        prompts = dataset_prompts(ds, train.num_samples)
        cells = [Cell(p, i, i // min(len(prompts), 8), i % min(len(prompts), 8)) for i, p in enumerate(prompts)]
        return ValidationPlan(cells, min(len(prompts), 8), [None], 1.0, train.sample_every)
    prompts = list(v.prompts) if v.prompts is not None else read_prompt_file(str(v.file))
    sizes = list(v.sizes) if v.sizes is not None else [None]
    n = len(prompts) * len(v.seeds) * len(sizes)
    if n > VALIDATION_MAX_IMAGES:  # a file's prompts are only counted here
        raise InputError(f"train.validation asks for {n} images per grid step (prompts x seeds x sizes); "
                         f"the limit is {VALIDATION_MAX_IMAGES}")
    m = _size_multiple(teacher)
    bad = [list(s) for s in sizes if s is not None and (s[0] % m or s[1] % m)]
    if bad:
        raise InputError(f"train.validation.sizes: {bad} are not multiples of {m} pixels (the {teacher.family} "
                         "teacher's latent factor)")
    cells = [Cell(p, s, r, c) for r, p in enumerate(prompts) for c, s in enumerate(v.seeds)]
    return ValidationPlan(cells, len(v.seeds), sizes, v.guidance, v.every or train.sample_every)


def _at_size(teacher: Teacher, cond: Cond, size: tuple[int, int] | None) -> Cond:
    """SDXL's micro-conditioning says which size to draw: (orig_h, orig_w, 0, 0, target_h, target_w)."""
    if size is None or cond.time_ids is None:
        return cond
    w, h = size
    ids = cond.time_ids.new_tensor([[h, w, 0.0, 0.0, h, w]]).expand(cond.time_ids.shape[0], 6)
    return Cond(cond.embeds, cond.pooled, ids)


def sample_cells(net: nn.Module, teacher: Teacher, timesteps: Sequence[int], param: Parameterisation,
                 cells: Sequence[Cell], size: tuple[int, int] | None, guidance: float) -> Tensor:
    """Latents [N, C, h, w] of `cells` at `size`, in chunks of CHUNK (every rank runs this)."""
    c = teacher.latent_channels
    shape = teacher.latent_shape(1)[1:] if size is None else (c, size[1] // teacher.vae_scale,
                                                              size[0] // teacher.vae_scale)
    out = []
    for i in range(0, len(cells), CHUNK):
        chunk = cells[i:i + CHUNK]
        cond = _at_size(teacher, teacher.encode([x.prompt for x in chunk]), size)
        uncond = _at_size(teacher, teacher.uncond(len(chunk)), size) if guidance > 1 else None
        out.append(sample(net, cond, timesteps, param, seeds=[x.seed for x in chunk], latent_shape=shape,
                          guidance=guidance, uncond=uncond))
    return torch.cat(out)


def _write_grid(teacher: Teacher, lat: Tensor, cols: int, path: Path) -> tuple[int, int]:
    """Decode in chunks of CHUNK and paste into one PNG: 256 decoded 1024² images at once would not fit a GPU."""
    from PIL import Image

    grid = None
    w = h = 0
    for i in range(0, lat.shape[0], CHUNK):
        images = to_uint8(teacher.decode(lat[i:i + CHUNK])).numpy()  # [n, H, W, 3]
        if grid is None:
            h, w = images.shape[1:3]
            rows = (lat.shape[0] + cols - 1) // cols
            grid = Image.new("RGB", (cols * w, rows * h))
        for j, arr in enumerate(images, start=i):
            grid.paste(Image.fromarray(arr), ((j % cols) * w, (j // cols) * h))
    assert grid is not None  # at least one cell
    grid.save(path)
    return int(w), int(h)


def grid_name(step: int, index: int, size: tuple[int, int] | None) -> str:
    return f"step-{step:08d}.png" if index == 0 or size is None else f"step-{step:08d}-{size[0]}x{size[1]}.png"


@torch.no_grad()
def render_validation(net: nn.Module, teacher: Teacher, timesteps: Sequence[int], param: Parameterisation,
                      plan: ValidationPlan, step: int, out_dir: Path | None) -> tuple[list[Path], Tensor]:
    """Sample every size; rank 0 (out_dir given) writes the grids and step-N.json.

    Returns the grid paths (empty on other ranks) and the first size's latents (stage 2 scores them).
    """
    paths: list[Path] = []
    grids: list[dict[str, Any]] = []
    first: Tensor | None = None
    for index, size in enumerate(plan.sizes):
        lat = sample_cells(net, teacher, timesteps, param, plan.cells, size, plan.guidance)
        first = lat if first is None else first
        if out_dir is None:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / grid_name(step, index, size)
        w, h = _write_grid(teacher, lat, plan.cols, path)
        paths.append(path)
        grids.append({"file": path.name, "size": [w, h], "rows": plan.cells[-1].row + 1, "cols": plan.cols})
    if out_dir is not None:
        meta = {"step": step, "guidance": plan.guidance, "grids": grids,
                "cells": [{"prompt": c.prompt, "seed": c.seed, "row": c.row, "col": c.col} for c in plan.cells]}
        (out_dir / f"step-{step:08d}.json").write_text(json.dumps(meta, indent=1))
    assert first is not None  # plan.sizes is never empty
    return paths, first
