"""The process entry: `flashdmd train|eval`, `python -m flashjob SPEC`, `accelerate launch -m flashjob SPEC`.

It sits above both `trainer/` (distill, rl, prepare) and `inference/` (eval) and dispatches a validated spec by
kind, so neither package imports the other's entry points. The command itself (read the spec, print and write
the resolved config, run the job with a sink) is trainer/entry.py's; `python -m trainer SPEC` runs the same
command with the trainer's kinds only. Exit codes: 0 finished, 2 bad spec or missing input, 3 stopped on
request (checkpoint written), 1 any other failure.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from trainer.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_STOPPED
from trainer.entry import TRAINER_KINDS, job_command, run_trainer_job
from trainer.jobspec import SpecError, load_spec

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_STOPPED", "eval_command", "main", "run_job",
           "train_command"]


def run_job(cfg: Any, sink: Any, *, run_dir: Path, resume: bool = False, hooks: Any = None) -> int:
    """Dispatch a spec by kind: eval (score checkpoints, through inference/), else the trainer's kinds (with
    the timeouts and test hooks the entry read, trainer/hooks.py)."""
    if cfg.kind == "eval":
        from inference.evaluate import run_eval

        return run_eval(cfg, sink, run_dir=run_dir, resume=resume)
    return run_trainer_job(cfg, sink, run_dir=run_dir, resume=resume, hooks=hooks)


train_command = job_command(run_job, (*TRAINER_KINDS, "eval"))


def main() -> None:
    train_command(prog_name="python -m flashjob")


@click.command("eval")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a spec field, e.g. eval.checkpoint=runs/x")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where metrics, grids and eval.json go (default runs/<spec name>)")
@click.pass_context
def eval_command(ctx: click.Context, spec: Path, overrides: tuple[str, ...], run_dir: Path | None) -> None:
    """Score checkpoints with a `kind: eval` spec (digits evaluator, or CLIP/PickScore/HPSv2/ImageReward/FID)."""
    try:
        kind = load_spec(spec, list(overrides)).kind
    except SpecError as err:
        click.echo(f"error: invalid spec {spec}:\n{err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if kind != "eval":
        click.echo(f"error: {spec} is a kind: {kind} spec; `flashdmd eval` runs kind: eval specs "
                   "(use `flashdmd train` for training)", err=True)
        sys.exit(EXIT_BAD_INPUT)
    ctx.invoke(train_command, spec=spec, overrides=overrides, run_dir=run_dir, resume=False, dry_run=False)
