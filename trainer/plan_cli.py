"""`flashdmd plan SPEC [--gpus N] [--gpu-mem-gib G] [--set k=v]`: the per-GPU memory budget of a spec."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from trainer.config import SpecError, load_spec

EXIT_BAD_INPUT = 2


def plan_text(cfg, gpus: int | None = None, gpu_mem_gib: float = 80.0) -> str:  # noqa: ANN001
    """The plan table of a validated spec (also printed by `flashdmd train --dry-run`)."""
    from trainer.plan import format_plan, make_plan

    return format_plan(make_plan(cfg, gpus=gpus, gpu_mem_gib=gpu_mem_gib))


@click.command("plan")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--gpus", type=click.IntRange(1, 1024), default=None,
              help="GPUs to plan for (default: the spec's train.num_processes)")
@click.option("--gpu-mem-gib", type=click.FloatRange(1, 4096), default=80.0, show_default=True,
              help="memory of one GPU")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a spec field")
def plan_command(spec: Path, gpus: int | None, gpu_mem_gib: float, overrides: tuple[str, ...]) -> None:
    """Print the per-GPU memory budget of SPEC by component, counted on the meta device (no weights loaded).

    Exit code 0 when it fits, 1 when it does not, 2 for a bad spec.
    """
    from trainer.errors import InputError

    try:
        cfg = load_spec(spec, list(overrides))
        from trainer.plan import format_plan, make_plan

        plan = make_plan(cfg, gpus=gpus, gpu_mem_gib=gpu_mem_gib)
    except (SpecError, InputError) as err:
        click.echo(f"error: {spec}:\n{err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(format_plan(plan))
    sys.exit(0 if plan.fits else 1)
