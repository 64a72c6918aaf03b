"""`train_rl(cfg, sink, run_dir=..., resume=...)`: the stage-2 (kind: rl) training function, the one loop
(trainer/loop.py run_loop) with the stage-2 method `RLMethod` (a JointRL, trainer/rl.py).

Initialisation (DESIGN §3): G, the fake score and (when present) the Pixel-GAN heads come from the stage-1
checkpoint named by `rl.init_from` (a `step-*` folder, or a run directory: its latest checkpoint); p_ref is a
frozen copy of that G. With `rl.init_from: null` everything starts from the teacher and a `warning` event says
so (the tiny preset does this, so it runs on a fresh clone with one command). Optimiser states start fresh.
Checkpoints use stage 1's layout (trainable/, unet/ or lora/, meta.json), so inference and export read them
as they read stage-1 ones; `rl.json` beside meta.json records where the run came from. Resuming re-runs the
same command with --resume: p_ref is rebuilt from `rl.init_from`, then the RL checkpoint is restored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import latest_checkpoint, load_trainable
from trainer.data import sharded_batches
from trainer.distill import Distiller
from trainer.errors import InputError
from trainer.hooks import Hooks
from trainer.hub import resolve_weights
from trainer.jobspec import RewardSpec, RLJob
from trainer.loop import prepare_data, run_loop
from trainer.memory import reward_for_training
from trainer.method import Method, Setup
from trainer.models import Teacher, predict_x0
from trainer.reward import LatentRewardModel, PixelReward, RewardModel, load_lrm, pixel_scorer
from trainer.rl import JointRL, RLBatch
from trainer.roots import check_opened
from trainer.sink import Sink
from trainer.validation import ValidationPlan, render_validation


def resolve_init(ref: str) -> Path:
    """A stage-1 checkpoint folder (with meta.json), or a run directory whose latest checkpoint is used."""
    path = check_opened(ref, "rl.init_from", kind="model", runs_ok=True)  # again, after realpath
    if not path.is_dir():
        raise InputError(f"rl.init_from: no such folder: {path}")
    if (path / "meta.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise InputError(f"rl.init_from: {path} is neither a checkpoint folder (meta.json) nor a run directory "
                         "with checkpoints/step-*")
    return latest


def load_stage1(ckpt: Path, distiller: Distiller) -> tuple[dict, list[str]]:
    """Copy the stage-1 weights into the distiller's networks; returns (meta, names loaded)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    t = distiller.teacher
    if meta.get("family") != t.family:
        raise InputError(f"rl.init_from: {ckpt} is a {meta.get('family')} checkpoint, the teacher is {t.family}")
    if list(meta.get("timesteps", [])) != list(distiller.S):
        raise InputError(f"rl.init_from: {ckpt} was trained with timesteps {meta.get('timesteps')}, but "
                         f"schedule.timesteps is {distiller.S}; use the stage-1 schedule")
    if (meta.get("lora") is None) != (distiller.lora is None):
        raise InputError(f"rl.init_from: {ckpt} has {'a LoRA' if meta.get('lora') else 'a full'} generator; "
                         "set model.lora to match it")
    loaded = []
    for name, mod in distiller.trainable_modules().items():
        path = ckpt / "trainable" / f"{name}.safetensors"
        if not path.is_file():
            if name == "generator":
                raise InputError(f"rl.init_from: {ckpt} has no trainable/generator.safetensors")
            continue  # e.g. no discriminator heads in a GAN-off stage-1 run: they start fresh
        try:
            load_trainable(mod, path, distiller.device)
        except ValueError as err:
            raise InputError(f"rl.init_from: {err}") from None
        loaded.append(name)
    return meta, loaded


def build_reward(spec: RewardSpec, teacher: Teacher, seed: int, sink: Sink) -> RewardModel:
    """The reward model named by rl.reward (built before bf16 casts of the teacher touch its weights). seed:
    train.seed, which draws an untrained LRM's random projection."""
    if spec.kind == "pixel":
        try:
            scorer = pixel_scorer(spec.scorer or "")
        except KeyError as err:
            raise InputError(str(err.args[0])) from None
        net = teacher.denoiser

        def denoise(z: torch.Tensor, t: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            cond = teacher.encode(list(prompts)).map(lambda v: v.to(net.dtype))
            return predict_x0(net, z.to(net.dtype), t, cond, teacher.param).float()

        return PixelReward(lambda x: teacher.decode(x).float(), scorer, denoise)
    if spec.path is None:
        sink.log_event("warning", "rl.reward.path is not set: the reward is an UNTRAINED Latent Reward Model built "
                       "from the teacher's UNet with a random projection; its preferences are arbitrary, so use "
                       "it only to check the plumbing", field="rl.reward.path")
        try:
            lrm = LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution,
                                                  vfe_scale=spec.vfe_scale, seed=seed)
        except TypeError as err:
            raise InputError(f"rl.reward: {err}") from None
    else:
        path = resolve_weights(spec.path, "rl.reward.path", want="folder")  # a hub id or a local folder
        try:
            lrm = load_lrm(path, base=teacher.pipe, resolution=teacher.resolution, vfe_scale=spec.vfe_scale)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise InputError(f"rl.reward.path: {err}") from None
        if int(lrm.unet.config.in_channels) != teacher.latent_channels:
            raise InputError(f"rl.reward.path: the LRM takes {lrm.unet.config.in_channels}-channel latents, the "
                             f"teacher makes {teacher.latent_channels}")
    return lrm.to(teacher.device).requires_grad_(False).eval()


def init_from_stage1(cfg: RLJob, distiller: Distiller, sink: Sink) -> Path | None:
    """Load rl.init_from into the distiller's networks (or warn that they start from the teacher)."""
    if cfg.rl.init_from is None:
        sink.log_event("warning", "rl.init_from is not set: G, the fake score and p_ref start from the teacher "
                       "(a multi-step model), not from a stage-1 generator; set rl.init_from for real runs",
                       field="rl.init_from")
        return None
    init = resolve_init(cfg.rl.init_from)
    meta, loaded = load_stage1(init, distiller)
    if meta.get("teacher") != cfg.model.teacher:
        sink.log_event("warning", f"rl.init_from was distilled from {meta.get('teacher')!r}, this run's "
                       f"teacher is {cfg.model.teacher!r}", field="rl.init_from")
    sink.log_event("init", f"initialised from {init} (step {meta.get('step')})", path=str(init), networks=loaded)
    return init


class RLMethod(JointRL):
    """Stage 2 as a training method of the loop (trainer/method.py). The spec runs it without FSDP
    (trainer/jobspec: p_ref is a copy of G), so its checkpoints are never sharded."""

    progress_keys = ("loss/rl", "rl/kept_frac", "rl/reward_mean", "loss/dm")
    sharded = False

    def __init__(self, setup: Setup, dataset: Any, reward: RewardModel) -> None:
        cfg = setup.cfg
        assert isinstance(cfg, RLJob)
        distiller = Distiller.for_job(cfg, setup.teacher, setup.acc, nonfinite_at=setup.hooks.nonfinite_at)
        self.init = init_from_stage1(cfg, distiller, setup.sink)
        super().__init__(distiller, reward, setup.acc, rl=cfg.rl)  # p_ref = the generator as initialised above
        self.cfg = cfg  # the job: checkpoints record it
        self.dataset, self.label = dataset, f"rl K={len(self.S)}"

    def started(self, start: int) -> tuple[str, dict[str, Any]]:
        rl = self.rl
        return f"joint RL from step {start}", {"rl_timesteps": self.rl_steps, "joint": rl.joint,
                                               "ratio": rl.ratio, "reward": rl.reward.kind}

    def batches(self, start: int) -> Iterator[RLBatch]:
        cfg, t = self.cfg, self.cfg.train
        shard = {"rank": self.acc.process_index, "world": self.acc.num_processes, "num_workers": cfg.data.num_workers}
        # Distillation batches consumed before `start`: one per RL step with critic updates every iteration
        # (joint), else one per distillation turn. RL updates take one prompt batch each (no accumulation).
        used = start if (cfg.rl.joint and cfg.rl.critic_updates == "every") else start // cfg.rl.ratio
        prompts_it = sharded_batches(self.dataset, cfg.rl.batch_size or t.batch_size, t.seed + 7919, start=start,
                                     **shard)
        distill_it = sharded_batches(self.dataset, t.batch_size, t.seed, accum=t.grad_accum, start=used, **shard)
        return ((list(p[0]["caption"]), lambda: next(distill_it)) for p in prompts_it)

    @torch.no_grad()
    def sample(self, plan: ValidationPlan, step: int, out_dir: Path | None,
               ) -> tuple[list[Path], dict[str, float], torch.Tensor]:
        """The validation grids (as stage 1 writes them) and the mean reward of the first size's final images."""
        paths, lat = render_validation(self.generator, self.teacher, self.S, self.param, plan, step, out_dir)
        zeros = torch.zeros(lat.shape[0], dtype=torch.long, device=lat.device)
        return paths, {"eval/reward": float(self.reward.score(lat, zeros, plan.prompts).float().mean())}, lat

    def checkpoint_meta(self) -> dict[str, dict]:
        rl = self.rl
        return {"rl.json": {"kind": "rl", "init_from": str(self.init) if self.init else None,
                            "reward": rl.reward.model_dump(), "rl_timesteps": self.rl_steps, "joint": rl.joint,
                            "ratio": rl.ratio, "critic_updates": rl.critic_updates}}


def _rl(setup: Setup) -> tuple[Method, ValidationPlan]:
    cfg = setup.cfg
    assert isinstance(cfg, RLJob)
    # The reward is built before the Distiller's bf16 cast of the teacher touches its weights.
    reward = reward_for_training(build_reward(cfg.rl.reward, setup.teacher, cfg.train.seed, setup.sink), cfg, setup.acc)
    ds, plan = prepare_data(setup)
    return RLMethod(setup, ds, reward), plan


def train_rl(cfg: RLJob, sink: Sink, *, run_dir: str | Path, resume: bool = False,
             hooks: Hooks = Hooks()) -> int:  # noqa: B008 - frozen, so one shared default is safe
    """Run stage 2 until cfg.train.max_steps RL updates; returns the last step."""
    return run_loop(cfg, sink, _rl, run_dir=run_dir, resume=resume, hooks=hooks)
