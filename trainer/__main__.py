"""`python -m trainer SPEC ...` (and `accelerate launch -m trainer SPEC ...`): the trainer's kinds (distill, rl,
prepare) through the same command as `python -m flashjob` (trainer/entry.py). `kind: eval` samples through
inference/, above the trainer, so it runs under `python -m flashjob` only."""

from trainer.entry import job_command, run_trainer_job

job_command(run_trainer_job)(prog_name="python -m trainer")
