"""`flashdmd toy ...`: rebuild the shipped digits teacher and evaluator, and measure the teacher.

    flashdmd toy train-teacher   [--out DIR] [--seed N] [--steps N] [--minutes M] [--vae-steps N] [--threads N]
    flashdmd toy train-evaluator [--out DIR] [--seed N] [--epochs N] [--threads N]
    flashdmd toy eval-teacher    [--teacher DIR] [--guidance W] [--per-class N] [--grid PNG] [--json FILE]
                                 [--reference-dir DIR]

The group is `toy_group`; the `flashdmd` CLI registers it with `cli.add_command(toy_group)`. Each command records
the exact command line it was run with in the files it writes. Exit code 2 on bad input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from trainer.toy import EVALUATOR_DIR, TEACHER_DIR


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


@click.group("toy", context_settings={"help_option_names": ["-h", "--help"]})
def toy_group() -> None:
    """The digits toy: a small SDXL-format teacher and a digits evaluator, trained by our code."""


@toy_group.command("train-teacher")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=TEACHER_DIR, show_default=True,
              help="pipeline folder to write (replaced)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--steps", type=click.IntRange(1), default=None, help="UNet steps  [default: 2000]")
@click.option("--minutes", type=click.FloatRange(min=0.1), default=None,
              help="wall-clock cap on the UNet stage (the LR schedule follows the clock)")
@click.option("--vae-steps", type=click.IntRange(1), default=None, help="VAE steps  [default: 600]")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch threads (1 is best on a busy machine)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def train_teacher_command(out: Path, seed: int, steps: int | None, minutes: float | None, vae_steps: int | None,
                          threads: int | None, quiet: bool) -> None:
    """Train the digits teacher (VAE 3-5 min, then UNet + text encoders 12-19 min on one busy core) and save it."""
    from trainer.toy.teacher import train_teacher
    from trainer.toy.teacher_train import Recipe

    recipe = Recipe(seed=seed, threads=threads)
    if steps is not None:
        recipe.steps = steps
    if vae_steps is not None:
        recipe.vae_steps = vae_steps
    recipe.minutes = minutes
    cmd = f"flashdmd toy train-teacher --seed {seed} --steps {recipe.steps} --vae-steps {recipe.vae_steps}"
    cmd += (f" --minutes {minutes}" if minutes else "") + (f" --threads {threads}" if threads else "")
    summary = train_teacher(out, recipe, progress=not quiet, command=cmd)
    click.echo(json.dumps({"out": str(out), **summary["metrics"], "total_minutes": summary["total_minutes"]},
                          indent=2))


@toy_group.command("train-evaluator")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=EVALUATOR_DIR, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--quiet", is_flag=True)
def train_evaluator_command(out: Path, seed: int, epochs: int, threads: int | None, quiet: bool) -> None:
    """Train the digits CNN on the real train split and save it (reports test accuracy)."""
    from trainer.toy.evaluate import train_evaluator

    _threads(threads)
    cmd = f"flashdmd toy train-evaluator --seed {seed} --epochs {epochs}" + (f" --threads {threads}" if threads else "")
    meta = train_evaluator(out, seed=seed, epochs=epochs, progress=not quiet, command=cmd)
    click.echo(json.dumps(meta, indent=2))
    if meta["test_accuracy"] < 0.97:
        click.echo(f"warning: test accuracy {meta['test_accuracy']:.4f} is below 0.97", err=True)


@toy_group.command("eval-teacher")
@click.option("--teacher", type=click.Path(file_okay=False, path_type=Path), default=TEACHER_DIR,
              show_default=True)
@click.option("--evaluator", type=click.Path(file_okay=False, path_type=Path), default=EVALUATOR_DIR,
              show_default=True)
@click.option("--guidance", type=click.FloatRange(min=1.0), default=None, help="CFG scale  [default: 2.0, evaluate.DEFAULT_GUIDANCE]")
@click.option("--per-class", type=click.IntRange(2), default=None, help="samples per digit (default 100)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write a PNG grid: 50-step samples, 4-step renoise, 4-step DDIM (10 digits x 3 rows each)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--reference-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where the teacher-50 reference statistics are cached (default: the flashdmd cache)")
@click.option("--threads", type=click.IntRange(1), default=None)
def eval_teacher_command(teacher: Path, evaluator: Path, guidance: float | None, per_class: int | None, seed: int,
                         grid: Path | None, json_out: Path | None, reference_dir: Path | None,
                         threads: int | None) -> None:
    """Score the teacher's 50-step CFG samples and its own 4-step samplers with the digits evaluator."""
    from trainer.errors import InputError
    from trainer.jobspec import ModelSpec
    from trainer.models import load_teacher
    from trainer.toy import evaluate as E
    from trainer.toy import reference as R
    from trainer.toy import teacher_sampling as TS

    _threads(threads)
    guidance = TS.DEFAULT_GUIDANCE if guidance is None else guidance
    per_class = per_class or TS.EVAL_PER_CLASS
    try:
        t = load_teacher(ModelSpec(teacher=str(teacher)))
    except InputError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    ev = E.DigitsEvaluator.load(evaluator)
    labels = TS.eval_labels(per_class)
    results: dict[str, dict] = {"real": ev.real_baselines()}
    samples, ref = {}, None
    for name, kw in [("teacher_euler50", dict(method="euler", steps=R.REFERENCE_STEPS)),
                     ("teacher_renoise4", dict(method="renoise")), ("teacher_ddim4", dict(method="ddim"))]:
        imgs = TS.generate(t, labels, guidance=guidance, seed=seed, progress=True, **kw)
        samples[name] = imgs
        if ref is None:  # the 50-step samples are the reference's samples: store their statistics
            ref = R.teacher_reference(t, ev, per_class=per_class, guidance=guidance, seed=seed,
                                      cache_dir=reference_dir, samples=imgs)
            # Their features too: `flashdmd demo` and the benchmarks score the teacher-50 row from them.
            R.teacher_features(t, ev, per_class=per_class, guidance=guidance, seed=seed, cache_dir=reference_dir,
                               samples=imgs)
        results[name] = ev.report(imgs, labels, reference=ref)
        click.echo(f"{name}: {json.dumps(results[name])}", err=True)
    results["settings"] = {"guidance": guidance, "per_class": per_class, "seed": seed, "teacher": str(teacher)}
    click.echo(json.dumps(results, indent=2))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(results, indent=2) + "\n")
    if grid:
        import torch
        from PIL import Image

        from trainer.sampling import image_grid

        rows = torch.cat([imgs[:30] for imgs in samples.values()])  # 3 rows of digits 0..9 per sampler
        grid.parent.mkdir(parents=True, exist_ok=True)
        image_grid(rows, cols=10).resize((10 * 64, 9 * 64), Image.NEAREST).save(grid)


def _register_reward() -> None:
    """`flashdmd toy train-reward`: the toy LRM (trainer/toy/reward.py), rebuilt as shipped."""
    from trainer.toy.reward import main as reward_main

    toy_group.add_command(reward_main, "train-reward")


_register_reward()
