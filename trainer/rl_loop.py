"""`train_rl(cfg, sink, run_dir=..., resume=...)`: the stage-2 (kind: rl) training function.

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
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_trainable,
    save_checkpoint,
    truncate_metrics,
)
from trainer.data import build_dataset, sharded_batches
from trainer.errors import InputError, StopRequested
from trainer.hub import resolve_weights
from trainer.loop import NonfiniteGuard, Progress, StopControl, _accelerator, amp_logs, failures_recorded
from trainer.memory import reward_for_training
from trainer.models import Teacher, load_teacher, predict_x0
from trainer.optim import check_runtime
from trainer.parallel import main_process_first, start_training
from trainer.reward import LatentRewardModel, PixelReward, RewardModel, load_lrm, pixel_scorer
from trainer.roots import check_opened
from trainer.sink import Sink
from trainer.spec import RewardSpec, RLJob
from trainer.textcache import prepare_text_cache
from trainer.trackers import finish_trackers, tracked_sink
from trainer.validation import ValidationPlan, plan_validation, render_validation


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


def load_stage1(ckpt: Path, distiller, cfg: RLJob) -> tuple[dict, list[str]]:  # noqa: ANN001
    """Copy the stage-1 weights into the distiller's networks; returns (meta, names loaded)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    t = distiller.teacher
    if meta.get("family") != t.family:
        raise InputError(f"rl.init_from: {ckpt} is a {meta.get('family')} checkpoint, the teacher is {t.family}")
    if list(meta.get("timesteps", [])) != list(distiller.S):
        raise InputError(f"rl.init_from: {ckpt} was trained with timesteps {meta.get('timesteps')}, but "
                         f"schedule.timesteps is {distiller.S}; use the stage-1 schedule")
    if (meta.get("lora") is None) != (cfg.model.lora is None):
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


def build_reward(spec: RewardSpec, teacher: Teacher, cfg: RLJob, sink: Sink) -> RewardModel:
    """The reward model named by rl.reward (built before bf16 casts of the teacher touch its weights)."""
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
                                                  vfe_scale=spec.vfe_scale, seed=cfg.train.seed)
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


@torch.no_grad()
def sample_and_score(rl, plan: ValidationPlan, step: int, out_dir: Path | None) -> tuple[list[Path], float]:  # noqa: ANN001
    """The validation grids (as stage 1 writes them, rank 0 only: out_dir given) and the mean reward of the
    first size's final images."""
    paths, lat = render_validation(rl.generator, rl.teacher, rl.S, rl.param, plan, step, out_dir)
    zeros = torch.zeros(lat.shape[0], dtype=torch.long, device=lat.device)
    return paths, float(rl.reward.score(lat, zeros, plan.prompts).float().mean())


def train_rl(cfg: RLJob, sink: Sink, *, run_dir: str | Path, resume: bool = False) -> int:
    """Run stage 2 until cfg.train.max_steps RL updates; returns the last step."""
    check_runtime(cfg)  # levers this machine cannot run (optim.optimizer: adamw8bit without CUDA) fail here
    progress = Progress()
    with failures_recorded(sink, progress):
        return _train_rl(cfg, sink, Path(run_dir), resume, progress)


def _train_rl(cfg: RLJob, sink: Sink, run_dir: Path, resume: bool, progress: Progress) -> int:
    from trainer.distill import Distiller
    from trainer.rl import JointRL

    acc = _accelerator(cfg, run_dir)  # a tracker whose extra is missing fails here, before any model loads
    if cfg.train.sharding == "fsdp" and acc.num_processes > 1:
        raise InputError("train.sharding: fsdp is not supported in stage 2 yet (p_ref is a copy of G); "
                         "use train.sharding: ddp")
    torch.manual_seed(cfg.train.seed)
    with main_process_first(acc, "loading the teacher"):  # rank 0 builds/downloads it once; the others read it
        teacher = load_teacher(cfg.model, acc.device, cfg.schedule.shift)
    reward = reward_for_training(build_reward(cfg.rl.reward, teacher, cfg, sink), cfg, acc)  # memory.reward_bf16
    ds = build_dataset(cfg.data, teacher.resolution)
    plan = plan_validation(cfg.train, ds, teacher)  # train.validation, or num_samples dataset captions
    prepare_text_cache(cfg, teacher, ds, run_dir, acc, plan.prompts)  # memory.text_cache (trainer/textcache.py)
    distiller = Distiller(cfg, teacher, acc)
    init = None
    if cfg.rl.init_from is None:
        sink.log_event("warning", "rl.init_from is not set: G, the fake score and p_ref start from the teacher "
                       "(a multi-step model), not from a stage-1 generator; set rl.init_from for real runs",
                       field="rl.init_from")
    else:
        init = resolve_init(cfg.rl.init_from)
        meta, loaded = load_stage1(init, distiller, cfg)
        if meta.get("teacher") != cfg.model.teacher:
            sink.log_event("warning", f"rl.init_from was distilled from {meta.get('teacher')!r}, this run's "
                           f"teacher is {cfg.model.teacher!r}", field="rl.init_from")
        sink.log_event("init", f"initialised from {init} (step {meta.get('step')})", path=str(init),
                       networks=loaded)
    rl = JointRL(cfg, distiller, reward, acc)  # p_ref = the generator as initialised above

    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, rl, acc)
        if acc.is_main_process:
            truncate_metrics(run_dir, start)
    progress.step = progress.last_saved = start
    start_training()  # every rank is ready: collectives from here run under the training timeout
    sink.log_event("started", f"joint RL from step {start}", step=start, max_steps=cfg.train.max_steps,
                   resumed=ckpt is not None, family=teacher.family, rl_timesteps=rl.rl_steps,
                   joint=cfg.rl.joint, ratio=cfg.rl.ratio, reward=cfg.rl.reward.kind)
    if start >= cfg.train.max_steps:
        sink.log_event("finished", "nothing to do: already at max_steps", step=start)
        return start

    rl_bs, t = cfg.rl.batch_size or cfg.train.batch_size, cfg.train
    shard = {"rank": acc.process_index, "world": acc.num_processes, "num_workers": cfg.data.num_workers}
    # Distillation batches consumed before `start`: one per RL step with critic updates every iteration
    # (joint), else one per distillation turn. RL updates take one prompt batch each (no accumulation).
    used = start if (cfg.rl.joint and cfg.rl.critic_updates == "every") else start // cfg.rl.ratio
    prompts_it = sharded_batches(ds, rl_bs, t.seed + 7919, start=start, **shard)
    distill_it = sharded_batches(ds, t.batch_size, t.seed, accum=t.grad_accum, start=used, **shard)
    sink = tracked_sink(sink, acc, cfg, run_dir, start=start)  # train.report_to: metrics and grids too
    stop, guard = StopControl(acc, sink), NonfiniteGuard(t.max_nonfinite)
    bar = tqdm(total=t.max_steps, initial=start, desc=f"rl K={len(rl.S)}", disable=not acc.is_main_process,
               dynamic_ncols=True)
    step = start
    try:
        while step < t.max_steps:
            t0 = time.perf_counter()
            logs = rl.step(list(next(prompts_it)[0]["caption"]), step, lambda: next(distill_it))
            step = progress.step = step + 1
            guard.observe(logs, step, sink)
            logs.update(amp_logs(acc))
            logs["time/step_s"] = time.perf_counter() - t0
            sample_now = plan.due(step, t.max_steps)
            if sample_now:  # every rank samples (a sharded G needs them all); rank 0 writes
                paths, logs["eval/reward"] = sample_and_score(rl, plan, step,
                                                              run_dir / "samples" if acc.is_main_process else None)
                for path in paths:
                    sink.log_event("sample", f"sample grid at step {step}", step=step, path=str(path))
            if step % t.log_every == 0 or step == t.max_steps or sample_now:
                sink.log_metrics(step, {k: v for k, v in logs.items() if math.isfinite(v)})
            bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()
                             if k in ("loss/rl", "rl/kept_frac", "rl/reward_mean", "loss/dm")})
            bar.update(1)
            requested = stop.requested(step)
            if step % t.checkpoint_every == 0 or step == t.max_steps or requested:
                final = save_checkpoint(run_dir, step, rl, acc, cfg, sink)
                if acc.is_main_process and final is not None:
                    (final / "rl.json").write_text(json.dumps({
                        "kind": "rl", "init_from": str(init) if init else None, "reward": cfg.rl.reward.model_dump(),
                        "rl_timesteps": rl.rl_steps, "joint": cfg.rl.joint, "ratio": cfg.rl.ratio,
                        "critic_updates": cfg.rl.critic_updates}, indent=2))
                progress.last_saved = step
            if requested:
                sink.log_event("stopped", f"stopped on request at step {step}", step=step)
                raise StopRequested(step)
    finally:
        bar.close()
        finish_trackers(acc)
    sink.log_event("finished", f"finished at step {step}", step=step)
    return step
