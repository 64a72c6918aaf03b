"""Stage 1 as a training method of the loop (trainer/method.py): the Distiller's Alg. 1 update, its data
order, its `started` fields and its validation grids."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.data import sharded_batches
from trainer.distill import Distiller, job_sections
from trainer.method import Setup
from trainer.parallel import gathered
from trainer.validation import ValidationPlan, render_validation


class DistillMethod(Distiller):
    """Flash-DMD (or DMD2) stage 1: one `step` is one update of every network (Alg. 1 lines 5-26)."""

    progress_keys = ("loss/dm", "loss/fake_score", "loss/disc", "loss/gen_adv")

    def __init__(self, setup: Setup, dataset: Any) -> None:
        super().__init__(setup.teacher, setup.acc, **job_sections(setup.cfg), nonfinite_at=setup.hooks.nonfinite_at)
        self.cfg, self.dataset = setup.cfg, dataset  # the job: checkpoints record it
        self.label = f"{self.distill.mode} K={len(self.S)}"

    def started(self, start: int) -> tuple[str, dict[str, Any]]:
        t = self.train
        return f"{self.distill.mode} distillation from step {start}", {
            "num_processes": self.acc.num_processes, "grad_accum": t.grad_accum, "sharding": t.sharding}

    def batches(self, start: int) -> Iterator[list[dict]]:
        t = self.train
        return sharded_batches(self.dataset, t.batch_size, t.seed, rank=self.acc.process_index,
                               world=self.acc.num_processes, accum=t.grad_accum, start=start,
                               num_workers=self.cfg.data.num_workers)

    def step(self, batch: dict | list[dict], step: int, **kwargs: Any) -> dict[str, float]:
        logs = super().step(batch, step, **kwargs)
        logs["lr/generator"] = self.opt_g.param_groups[0]["lr"]
        return logs

    def sample(self, plan: ValidationPlan, step: int, out_dir: Path | None,
               ) -> tuple[list[Path], dict[str, float], torch.Tensor]:
        with gathered(self.generator):  # FSDP: one gather for the K-step sampling, not one per step
            paths, lat = render_validation(self.generator, self.teacher, self.S, self.param, plan, step, out_dir)
        return paths, {}, lat

    def checkpoint_meta(self) -> dict[str, dict]:
        return {}
