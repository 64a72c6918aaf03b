"""The sections every training job shares: the step schedule S, the optimisers, the memory levers and the loop.

The cross-section rules (sharding against optimiser, LoRA and stage 2) are checked once, on the job
(trainer/jobspec/distill.py DistillJob), because they read more than one section.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictFloat, StrictInt, field_validator, model_validator

from trainer.jobspec.base import NUM_TRAIN_TIMESTEPS, Strict, default_timesteps
from trainer.jobspec.limits import (
    INT32_MAX,
    SEED_MAX,
    VALIDATION_MAX_IMAGES,
    VALIDATION_MAX_PROMPT_CHARS,
    VALIDATION_MAX_PROMPTS,
    VALIDATION_MAX_SEEDS,
    VALIDATION_MAX_SIZES,
)


class ScheduleSpec(Strict):
    num_steps: int = Field(4, ge=1, le=50, description="K, the generator's step count")
    timesteps: list[int] | None = Field(None, description="S = [tau_K .. tau_1], high noise first")
    dm_steps: list[int] | None = Field(None, description="steps that get the DM loss; default all but last")
    gan_steps: list[int] | None = Field(None, description="low-noise steps for the GAN; default the last")
    shift: float | None = Field(None, gt=0, description="flow-matching shift; default the teacher's")

    @model_validator(mode="after")
    def _resolve(self) -> ScheduleSpec:
        ts = self.timesteps if self.timesteps is not None else default_timesteps(self.num_steps)
        if len(ts) != self.num_steps:
            raise ValueError(f"schedule.timesteps has {len(ts)} entries but schedule.num_steps is {self.num_steps}")
        if any(t < 0 or t >= NUM_TRAIN_TIMESTEPS for t in ts):
            raise ValueError(f"schedule.timesteps must lie in [0, {NUM_TRAIN_TIMESTEPS - 1}]")
        if any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
            raise ValueError("schedule.timesteps must be strictly decreasing (high noise first)")
        dm = self.dm_steps if self.dm_steps is not None else (ts[:-1] if len(ts) > 1 else ts)
        gan = self.gan_steps if self.gan_steps is not None else ts[-1:]
        for name, sub in (("dm_steps", dm), ("gan_steps", gan)):
            bad = [t for t in sub if t not in ts]
            if bad:
                raise ValueError(f"schedule.{name} {bad} are not in schedule.timesteps {ts}")
        if not dm:
            raise ValueError("schedule.dm_steps must not be empty")
        # Assign through __dict__ so validate_assignment does not recurse into this validator.
        self.__dict__.update(timesteps=list(ts), dm_steps=list(dm), gan_steps=list(gan))
        return self



class OptimizerSpec(Strict):
    lr: float = Field(5e-7, gt=0, le=1)
    # Not strict: a stored spec is JSON, where the tuple comes back as a list; the items stay strict floats.
    betas: tuple[StrictFloat, StrictFloat] = Field((0.9, 0.999), strict=False)
    weight_decay: float = Field(0.01, ge=0)
    eps: float = Field(1e-8, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("betas must lie in [0, 1)")
        return v


class OptimSpec(Strict):
    generator: OptimizerSpec = Field(default_factory=OptimizerSpec)
    fake_score: OptimizerSpec = Field(default_factory=OptimizerSpec)
    discriminator: OptimizerSpec = Field(default_factory=lambda: OptimizerSpec(lr=2e-5, betas=(0.0, 0.99)))
    grad_clip: float | None = Field(10.0, gt=0, description="max grad norm for every network; null: off")
    warmup_steps: int = Field(0, ge=0, le=INT32_MAX)
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="the optimiser of every trainable network; adamw8bit: bitsandbytes' block-wise "
        "8-bit AdamW (2 B/param of state instead of 8; needs CUDA and `pip install 'flashdmd[gpu]'`)")
    adamw8bit_backend: Literal["bitsandbytes", "torchao"] = Field(
        "bitsandbytes", description="the library behind optim.optimizer: adamw8bit: bitsandbytes (CUDA kernels), "
        "or torchao's AdamW8bit (the same block-wise 8-bit states, compiled by torch.compile; no CUDA build)")


# ------------------------------------------------------------------ memory levers
class MemorySpec(Strict):
    """Memory levers: each one is measured by bench/gpu_train_step.py and counted by `flashdmd plan`."""

    text_cache: bool = Field(False, description="encode every caption once into a safetensors cache "
                             "(trainer/textcache.py) and keep the text encoders off the GPU while training")
    cache_dir: str | None = Field(None, description="the cache folder; default <run_dir>/cache. One folder can "
                                  "serve many runs of the same teacher: entries are keyed by content hash")
    vae_decode_checkpointing: bool = Field(False, description="recompute the VAE decoder's resnets in backward "
                                           "on the Pixel-GAN path instead of storing their 1024² activations")
    sam_sdpa: bool = Field(False, description="SAM encoder attention through F.scaled_dot_product_attention "
                           "(same result; no materialised softmax matrix)")
    ref_bf16: bool = Field(False, description="stage 2: keep the frozen reference policy p_ref in bf16")
    reward_bf16: bool = Field(False, description="stage 2: the frozen reward model's weights in bf16, run "
                              "under autocast")
    rl_optimizer: Literal["separate", "shared"] = Field(
        "separate", description="stage 2: separate: a second AdamW for L_rl (rl.optimizer); shared: L_rl steps "
        "the generator's own optimiser at rl.optimizer.lr (one generator, one set of moments, as in Alg. 1)")


ValidationSide = Annotated[StrictInt, Field(ge=16, le=4096, multiple_of=8)]


class ValidationSpec(Strict):
    """Fixed prompts and seeds for the sample grids (trainer/validation.py), so that runs compare side by side."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=VALIDATION_MAX_PROMPT_CHARS)]] | None = Field(
        None, min_length=1, max_length=VALIDATION_MAX_PROMPTS)
    file: str | None = Field(None, min_length=1, max_length=4096, description="text file, one prompt per line")
    seeds: list[Annotated[int, Field(ge=0, le=SEED_MAX)]] = Field(
        default_factory=lambda: [0], min_length=1, max_length=VALIDATION_MAX_SEEDS,
        description="every prompt is sampled with every seed; image noise depends on its seed alone")
    every: int | None = Field(None, ge=1, le=INT32_MAX, description="steps between grids; default train.sample_every")
    guidance: float = Field(1.0, ge=1, le=30, description="CFG at sampling; few-step students use 1")
    # Not strict: a stored spec is JSON, where each [w, h] pair comes back as a list.
    sizes: list[Annotated[tuple[ValidationSide, ValidationSide], Field(strict=False)]] | None = Field(
        None, min_length=1, max_length=VALIDATION_MAX_SIZES,
        description="[[width, height], ...] in pixels; default the training resolution")

    @model_validator(mode="after")
    def _check(self) -> ValidationSpec:
        if (self.prompts is None) == (self.file is None):
            raise ValueError("give exactly one of train.validation.prompts and train.validation.file")
        n = len(self.prompts or [1]) * len(self.seeds) * len(self.sizes or [1])
        if n > VALIDATION_MAX_IMAGES:
            raise ValueError(f"train.validation asks for {n} images per grid step (prompts x seeds x sizes); "
                             f"the limit is {VALIDATION_MAX_IMAGES}")
        return self


class GuardSpec(Strict):
    """The collapse guard (trainer/guard.py): image statistics of each validation grid, an event when one stays
    out of bounds for `patience` validations in a row, and with `action: stop` a checkpoint and a stop."""

    enabled: bool = False
    patience: int = Field(3, ge=1, le=1000, description="validations in a row out of bounds before it trips")
    max_saturation: float = Field(0.75, ge=0.0, le=1.0, description="share of pixel values at the range's ends")
    max_drift: float = Field(0.3, ge=0.0, le=2.0, description="largest channel-mean change from the first grid")
    min_diversity: float = Field(0.25, ge=0.0, le=2.0,
                                 description="mean pairwise latent distance, as a fraction of the first grid's")
    action: Literal["stop", "warn"] = Field("stop", description="stop: checkpoint and fail with code collapsed; "
                                            "warn: a `guard` event only")


class TrainSpec(Strict):
    max_steps: int = Field(1000, ge=1, le=INT32_MAX, description="loop iterations (one fake-score update each)")
    batch_size: int = Field(1, ge=1, le=4096, description="per process")
    grad_accum: int = Field(1, ge=1, le=1024, description="micro-batches per optimiser update (no sync between)")
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    gradient_checkpointing: bool = False
    seed: int = Field(0, ge=0, le=SEED_MAX)
    checkpoint_every: int = Field(500, ge=1, le=INT32_MAX)
    sample_every: int = Field(500, ge=1, le=INT32_MAX)
    num_samples: int = Field(4, ge=1, le=64)
    validation: ValidationSpec | None = Field(
        None, description="prompts/seeds/sizes of the sample grids; null: the first num_samples dataset captions")
    guard: GuardSpec = Field(default_factory=GuardSpec, description="the collapse guard; off by default")
    keep_last: int = Field(3, ge=1, le=INT32_MAX)
    log_every: int = Field(1, ge=1, le=INT32_MAX)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, max_length=3, description="experiment trackers (accelerate's): scalars every "
        "log step and sample grids as images, under <run_dir>/trackers/; each needs its extra, e.g. "
        "pip install 'flashdmd[tensorboard]'")
    max_nonfinite: int = Field(10, ge=1, le=INT32_MAX, description="consecutive NaN/inf steps before failing")
    num_processes: int = Field(1, ge=1, le=1024, description="GPUs for accelerate launch")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp: full replicas, bucketed gradient all-reduce; fsdp: FSDP2 fully_shard of "
        "parameters, gradients and optimiser states across the processes")

