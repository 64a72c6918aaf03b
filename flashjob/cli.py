"""The process entry: `flashdmd train|eval`, `python -m flashjob SPEC`, `accelerate launch -m flashjob SPEC`.

It sits above both `trainer/` (distill, rl) and `inference/` (eval) and dispatches a validated spec by kind,
so neither package imports the other's entry points. `python -m trainer SPEC` stays as an alias (it runs
this module). Build one validated config, print it, write it, call the job function with a sink.
Exit codes: 0 finished, 2 bad spec or missing input, 3 stopped on request (checkpoint written), 1 any other
failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from trainer.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_STOPPED, cpu_threads
from trainer.spec import SpecError, load_spec

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_OK", "EXIT_STOPPED", "eval_command", "main", "run_job",
           "train_command"]


def run_job(cfg, sink, *, run_dir: Path, resume: bool = False) -> int:  # noqa: ANN001
    """Dispatch a spec by kind: distill (stage 1), rl (stage 2), eval (score checkpoints)."""
    if cfg.kind == "rl":
        from trainer.rl_loop import train_rl

        return train_rl(cfg, sink, run_dir=run_dir, resume=resume)
    if cfg.kind == "prepare":
        from trainer.prepare import run_prepare

        return run_prepare(cfg, sink, run_dir=run_dir, resume=resume)
    if cfg.kind == "eval":
        from inference.evaluate import run_eval

        return run_eval(cfg, sink, run_dir=run_dir, resume=resume)
    from trainer.loop import train

    return train(cfg, sink, run_dir=run_dir, resume=resume)


@click.command("train")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a spec field, e.g. train.max_steps=20")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="where config, metrics, samples and checkpoints go (default runs/<spec name>)")
@click.option("--resume", is_flag=True, help="continue from the run directory's latest checkpoint")
@click.option("--dry-run", is_flag=True, help="print the resolved config and exit")
def train_command(spec: Path, overrides: tuple[str, ...], run_dir: Path | None, resume: bool, dry_run: bool) -> None:
    """Distil a teacher into a few-step generator with Flash-DMD (or the dmd2 baseline)."""
    try:
        cfg = load_spec(spec, list(overrides))
    except SpecError as err:
        click.echo(f"error: invalid spec {spec}:\n{err}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    resolved = cfg.model_dump(mode="json")
    if dry_run:
        click.echo(json.dumps(resolved, indent=2))
        if cfg.kind not in ("eval", "prepare"):  # the memory plan of `flashdmd plan`, on stderr: stdout stays the JSON
            from trainer.errors import InputError
            from trainer.plan_cli import plan_text

            try:
                click.echo(plan_text(cfg), err=True)
            except InputError as err:
                click.echo(f"(no memory plan: {err})", err=True)
        return
    run_dir = run_dir or Path("runs") / spec.stem
    # Imported here so that `--dry-run` and spec errors answer without loading torch.
    from trainer.errors import InputError, StopRequested, TrainingError
    from trainer.sink import JsonlSink

    try:
        code = _run(run_job, cfg, run_dir, resume, resolved, JsonlSink)
    except InputError as err:
        click.echo(f"error: {err}", err=True)
        _record_failure(run_dir, err)
        sys.exit(EXIT_BAD_INPUT)
    except TrainingError as err:
        click.echo(f"error: training failed: {err}", err=True)
        sys.exit(EXIT_FAILED)
    except StopRequested as stop:
        click.echo(f"stopped on request at step {stop.step}; resume with --resume", err=True)
        sys.exit(EXIT_STOPPED)
    sys.exit(code)


def _record_failure(run_dir: Path, err: Exception) -> None:
    """The run's `failed` event with its code and one-line cause (trainer/errors.py classify): what the service
    shows as the job's error, instead of the end of this process's log."""
    import os

    from trainer.errors import classify
    from trainer.sink import JsonlSink

    failure = classify(err)
    try:
        sink = JsonlSink(run_dir, enabled=os.environ.get("RANK", "0") == "0")
    except OSError:  # the run dir itself is the problem: the message on stderr is all there is
        return
    sink.log_event("failed", failure.message, code=failure.code, message=failure.message, step=0,
                   last_checkpoint=None)
    sink.close()


def _run(train, cfg, run_dir: Path, resume: bool, resolved: dict, sink_cls) -> int:  # noqa: ANN001
    import torch

    from trainer.parallel import init_state

    threads = cpu_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        state = init_state()
    except RuntimeError as err:  # the rendezvous itself failed: record it (as rank 0 of the launch would)
        import os

        from trainer.errors import TrainingError

        sink = sink_cls(run_dir, enabled=os.environ.get("RANK", "0") == "0")
        message = f"the process group could not be set up: {err}"
        sink.log_event("failed", message, code="TrainingError", message=message, step=0, last_checkpoint=None)
        sink.close()
        raise TrainingError(message) from None
    sink = sink_cls(run_dir, enabled=state.is_main_process)
    if state.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
        click.echo(json.dumps(resolved, indent=2), err=True)
    try:
        train(cfg, sink, run_dir=run_dir, resume=resume)
    finally:
        sink.close()
    return EXIT_OK


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
