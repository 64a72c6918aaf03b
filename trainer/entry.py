"""The job command's machinery: read a spec, print and write the resolved config, run the job with a sink.

`job_command(run_job)` builds the click command; the job function it is given decides which kinds it runs.
`python -m trainer` (trainer/__main__.py) runs the trainer's own kinds (distill, rl, prepare) with it; the
process entry `python -m flashjob` (flashjob/cli.py), above trainer/ and inference/, adds `kind: eval`. So this
module reaches only trainer/ code, and the trainer never imports the layer above it.
Exit codes (trainer/cli.py): 0 finished, 2 bad spec or missing input, 3 stopped on request (checkpoint written),
1 any other failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol

import click

from trainer.cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    configure_process,
    cpu_threads,
    hooks_from_env,
    quiet_libraries,
)
from trainer.hooks import Hooks
from trainer.jobspec import SpecError, load_spec

TRAINER_KINDS = ("distill", "rl", "prepare")


class RunJob(Protocol):
    def __call__(self, cfg: Any, sink: Any, *, run_dir: Path, resume: bool = False,
                 hooks: Hooks | None = None) -> int: ...


def run_trainer_job(cfg: Any, sink: Any, *, run_dir: Path, resume: bool = False, hooks: Hooks | None = None) -> int:
    """Dispatch the trainer's kinds: distill (stage 1), rl (stage 2), prepare (the data cache). hooks: the
    timeouts and test hooks of trainer/hooks.py (None: a production run's defaults)."""
    hooks = hooks or Hooks()
    if cfg.kind == "rl":
        from trainer.rl_loop import train_rl

        return train_rl(cfg, sink, run_dir=run_dir, resume=resume, hooks=hooks)
    if cfg.kind == "prepare":
        from trainer.prepare import run_prepare

        return run_prepare(cfg, sink, run_dir=run_dir, resume=resume)
    from trainer.loop import train

    return train(cfg, sink, run_dir=run_dir, resume=resume, hooks=hooks)


def job_command(run_job: RunJob, kinds: tuple[str, ...] = TRAINER_KINDS) -> click.Command:
    """The `train` command (`flashdmd train`, `python -m flashjob`, `python -m trainer`): `run_job` runs the
    spec kinds in `kinds`; any other kind is refused before the run directory is touched."""

    @click.command("train")
    @click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a spec field, e.g. train.max_steps=20")
    @click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="where config, metrics, samples and checkpoints go (default runs/<spec name>)")
    @click.option("--resume", is_flag=True, help="continue from the run directory's latest checkpoint")
    @click.option("--dry-run", is_flag=True, help="print the resolved config and exit")
    def train_command(spec: Path, overrides: tuple[str, ...], run_dir: Path | None, resume: bool,
                      dry_run: bool) -> None:
        """Distil a teacher into a few-step generator with Flash-DMD (or the dmd2 baseline)."""
        configure_process()  # first: the roots the worker handed over and the cache root, before the spec is read
        try:
            cfg = load_spec(spec, list(overrides))
        except SpecError as err:
            click.echo(f"error: invalid spec {spec}:\n{err}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        if cfg.kind not in kinds:
            # kind: eval samples checkpoints through inference/, a layer above the trainer.
            click.echo(f"error: {spec} is a kind: {cfg.kind} spec; run it with `python -m flashjob` "
                       f"(or `flashdmd eval`)", err=True)
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

    return train_command


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


def _run(train: RunJob, cfg: Any, run_dir: Path, resume: bool, resolved: dict, sink_cls: Any) -> int:
    import torch

    from trainer.parallel import init_state

    hooks = hooks_from_env()  # the process entry reads the environment once and passes it down
    quiet_libraries()
    threads = cpu_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        state = init_state(hooks.startup_timeout_s)
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
        # One line, not the spec: the log is what the dashboard and `flashdmd jobs logs` show, and the resolved
        # spec is in config.json (and `--dry-run` prints it).
        click.echo(f"resolved spec: {run_dir / 'config.json'}", err=True)
    try:
        train(cfg, sink, run_dir=run_dir, resume=resume, hooks=hooks)
    finally:
        sink.close()
    return EXIT_OK
