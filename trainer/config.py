"""The job spec: one validated config object for every job kind (DESIGN §5, issue #2).

This module imports only pydantic and yaml so that the API can validate a spec
without importing torch. Every model forbids unknown keys, so a typo is an
error that names the field instead of a silently ignored setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from trainer.spec_limits import (
    INT32_MAX,
    PIXEL_SCORER_NAMES,
    SAM_DEPTH,
    SEED_MAX,
    TINY_FAMILIES,
    TOY_MODELS,
    VALIDATION_MAX_IMAGES,
    VALIDATION_MAX_PROMPT_CHARS,
    VALIDATION_MAX_PROMPTS,
    VALIDATION_MAX_SEEDS,
    VALIDATION_MAX_SIZES,
    check_storable_text,
    is_union_tag,
    load_yaml,
)

NUM_TRAIN_TIMESTEPS = 1000
Family = Literal["sdxl", "sd15", "sd3"]

# Real-score CFG defaults per family (DESIGN §3; DMD2 uses 8 for SDXL, 1.75 for SD1.5).
DEFAULT_REAL_GUIDANCE: dict[str, float] = {"sdxl": 8.0, "sd15": 1.75, "sd3": 4.0}
# Global-attention block indices of the SAM encoders (segment-anything build_sam.py).
SAM_GLOBAL_BLOCKS: dict[str, list[int]] = {
    "vit_b": [2, 5, 8, 11],
    "vit_l": [5, 11, 17, 23],
    "vit_h": [7, 15, 23, 31],
    "tiny": [1, 3],
}


class _Strict(BaseModel):
    # strict: "2" or true for an int is an error, not a silent coercion (YAML and `--set` give real
    # numbers and booleans: see spec_limits.load_yaml). allow_inf_nan: JSON "Infinity" parses to a float that
    # SQLite stores as malformed JSON and Postgres refuses; no spec value is meaningful as inf or NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        return check_storable_text(value)


def default_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """DMD2's list: range(T-1, 0, -T//K), e.g. K=4 -> [999, 749, 499, 249]."""
    stride = num_train_timesteps // num_steps
    return list(range(num_train_timesteps - 1, 0, -stride))[:num_steps]


class LoraSpec(_Strict):
    rank: int = Field(64, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0)
    target_modules: list[str] | None = None  # None: the family's attention projections
    dropout: float = Field(0.0, ge=0, lt=1)


class ModelSpec(_Strict):
    teacher: str = Field(min_length=1, max_length=4096,
                         description="hub id, local diffusers folder, tiny:<family> or toy:digits")
    family: Literal["auto", "sdxl", "sd15", "sd3"] = "auto"
    revision: str | None = None
    resolution: int | None = Field(None, ge=16, le=4096, multiple_of=8,
                                   description="pixels, a multiple of 8 (the VAE's factor); default: the teacher's")
    lora: LoraSpec | None = None

    @field_validator("teacher")
    @classmethod
    def _builtin_name(cls, value: str) -> str:
        # Checked here, not only in the worker, so that `tiny:../../etc` is a 422 at submit.
        kind, _, name = value.partition(":")
        known = {"tiny": TINY_FAMILIES, "toy": TOY_MODELS}.get(kind)
        if known is not None and name not in known:
            raise ValueError(f"unknown {kind} model {name!r}; expected one of " + ", ".join(f"{kind}:{n}" for n in known))
        return value


class BucketSpec(_Strict):
    """Aspect-ratio buckets (trainer/buckets.py): each batch has one size; SDXL gets per-sample size/crop ids."""

    enabled: bool = False
    sizes: Literal["sdxl"] | list[tuple[int, int]] | None = Field(
        None, description="'sdxl' (SDXL's 41 sizes) or [[height, width], ...]; default: derived from target_pixels")
    target_pixels: int | None = Field(None, ge=64, le=16 * 2**20, description="pixels per bucket; default "
                                      "model.resolution squared")
    step: int = Field(64, ge=1, le=1024, description="derived buckets: sides are multiples of this")
    crop: Literal["center", "random"] = Field("center", description="random: seeded per sample (train.seed)")


class DataSpec(_Strict):
    images: str | None = Field(None, description="folder of images with same-named .txt captions")
    manifest: str | None = Field(None, description="JSONL with {image, caption} per line")
    prompts: str | None = Field(None, description="text file, one prompt per line (no real images)")
    builtin: Literal["digits", "digits-train"] | None = Field(
        None, description="a dataset shipped in a package; digits-train: the digits minus the held-out FD reference")
    num_workers: int = Field(0, ge=0, le=64)
    center_crop: bool = True
    random_flip: bool = False
    buckets: BucketSpec = Field(default_factory=BucketSpec)
    cache: str | None = Field(None, description="a `flashdmd data prepare` cache: latents + text embeddings")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        sources = [s for s in ("images", "manifest", "prompts", "builtin", "cache") if getattr(self, s)]
        if not sources:
            raise ValueError("give one of data.images, data.manifest, data.prompts, data.builtin or data.cache")
        if self.buckets.enabled and (self.prompts or self.builtin):
            raise ValueError("data.buckets needs real images of their own sizes (data.images or data.manifest)")
        if self.random_flip and (self.buckets.enabled or self.cache):
            raise ValueError("data.random_flip is not supported with data.buckets or data.cache (the crop "
                             "conditioning would no longer describe the image)")
        if len(sources) > 1:
            raise ValueError(f"give only one data source, got {', '.join('data.' + s for s in sources)}")
        return self

    @property
    def has_real_images(self) -> bool:
        return not self.prompts


class ScheduleSpec(_Strict):
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


class DiscriminatorSpec(_Strict):
    backbone: Literal["vit_b", "vit_l", "vit_h", "tiny"] = "vit_l"
    checkpoint: str | None = Field(None, description="SAM .pth (image_encoder.* keys) or a hub id "
                                      "org/name[/file][@revision]; required for vit_*")
    blocks: list[int] | None = Field(None, description="encoder blocks with heads; default: global attention")
    img_size: int | None = Field(None, ge=16, le=4096, description="encoder input size; 1024 for vit_*, 64 for tiny")
    head_channels: int = Field(256, ge=8, le=4096)

    @model_validator(mode="after")
    def _resolve(self) -> DiscriminatorSpec:
        blocks = self.blocks if self.blocks is not None else SAM_GLOBAL_BLOCKS[self.backbone]
        depth = SAM_DEPTH[self.backbone]
        if not blocks or any(not 0 <= b < depth for b in blocks):
            raise ValueError(f"distill.discriminator.blocks must be indices in [0, {depth - 1}] "
                             f"(the {self.backbone} encoder has {depth} blocks), got {blocks}")
        img = self.img_size or (64 if self.backbone == "tiny" else 1024)
        self.__dict__.update(blocks=list(blocks), img_size=img)
        return self


class DistillSpec(_Strict):
    mode: Literal["flash", "dmd2"] = "flash"
    ttur: int | None = Field(None, ge=1, le=100, description="fake-score updates per generator update")
    ema: float | None = Field(None, ge=0, lt=1, description="lambda_ema of Eq. (11); 0 turns it off")
    real_guidance: float | None = Field(None, ge=1, description="teacher CFG in the DM loss")
    fake_guidance: float = Field(1.0, ge=1)
    dm_min: float = Field(0.02, ge=0, le=1)
    dm_max: float = Field(0.98, ge=0, le=1)
    dm_weight: float = Field(1.0, ge=0)
    gan_weight: float | None = Field(None, ge=0, description="lambda on the generator's adversarial loss")
    disc_weight: float = Field(1.0, ge=0, description="dmd2 mode: weight of L_D in the fake-score loss")
    gan_loss: Literal["hinge", "logistic"] | None = Field(
        None, description="default: hinge for flash (Alg. 1 line 25), logistic/softplus for dmd2")
    discriminator: DiscriminatorSpec = Field(default_factory=DiscriminatorSpec)

    @model_validator(mode="after")
    def _resolve(self) -> DistillSpec:
        if self.dm_min >= self.dm_max:
            raise ValueError("distill.dm_min must be below distill.dm_max")
        flash = self.mode == "flash"
        updates: dict[str, Any] = {}
        if self.ttur is None:
            updates["ttur"] = 1 if flash else 5
        if self.ema is None:
            updates["ema"] = 0.98 if flash else 0.0
        elif not flash and self.ema:
            raise ValueError("distill.ema must be 0 in dmd2 mode (DMD2 has no EMA injection)")
        if self.gan_weight is None:
            # DMD2's 5e-3 (its latent head). The paper gives no lambda for the Pixel-GAN, so flash
            # starts from the same value; the digits benchmark (bench/quality_vs_cost.py) revisits it.
            updates["gan_weight"] = 5e-3
        if self.gan_loss is None:
            updates["gan_loss"] = "hinge" if flash else "logistic"
        if not flash and "disc_weight" not in self.model_fields_set:
            updates["disc_weight"] = 1e-2
        self.__dict__.update(updates)
        return self


class OptimizerSpec(_Strict):
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


class OptimSpec(_Strict):
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


# ------------------------------------------------------------------ memory levers (issue #10 §2)
class MemorySpec(_Strict):
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


class ValidationSpec(_Strict):
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


class TrainSpec(_Strict):
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


class DistillJob(_Strict):
    kind: Literal["distill"] = "distill"
    name: str | None = Field(None, max_length=200)
    model: ModelSpec
    data: DataSpec
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    distill: DistillSpec = Field(default_factory=DistillSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    memory: MemorySpec = Field(default_factory=MemorySpec)

    @model_validator(mode="after")
    def _cross(self) -> DistillJob:
        if self.optim.optimizer == "adamw8bit" and self.train.sharding == "fsdp":
            # bitsandbytes keeps its 8-bit states per plain tensor; FSDP2 parameters are DTensors. FSDP
            # already divides the optimiser state by the GPU count, so the 8-GPU preset uses adamw.
            raise ValueError("optim.optimizer: adamw8bit does not run with train.sharding: fsdp "
                             "(bitsandbytes does not shard DTensor states); use adamw with fsdp")
        for lever in ("ref_bf16", "reward_bf16"):
            if getattr(self.memory, lever) and self.train.mixed_precision != "bf16":
                raise ValueError(f"memory.{lever} needs train.mixed_precision: bf16 (the bf16 weights run "
                                 "under bf16 autocast)")
        if not self.data.has_real_images and self.distill.gan_weight:
            raise ValueError("data.prompts has no real images for the GAN: use images/manifest/builtin "
                             "or set distill.gan_weight: 0")
        if self.train.sharding == "fsdp" and (self.model.lora is not None or self.kind == "rl"):
            raise ValueError("train.sharding: fsdp shards full-weight stage-1 training; LoRA runs and stage 2 "
                             "(kind: rl) use train.sharding: ddp")
        return self


# ------------------------------------------------------------------ stage 2: joint RL (Sec. 3.4, issue #6)

# LPO's SDXL thresholds on the softmax gap of a (winner, loser) score pair; SD1.5 uses [0.35, 0.5].
RL_THRESHOLD_SDXL: tuple[float, float] = (0.45, 0.6)


class RewardSpec(_Strict):
    kind: Literal["lrm", "pixel"] = "lrm"
    path: str | None = Field(None, description="lrm: a Latent Reward Model folder (unet/, text_encoder*/, "
                             "state_dict.pt) or a hub id org/name[/folder][@revision]; null: an UNTRAINED LRM built from the teacher (smoke tests only)")
    scorer: str | None = Field(None, description="pixel: a registered image scorer (trainer.reward.PIXEL_SCORERS)")
    vfe_scale: float = Field(7.5, ge=1, description="LRM visual feature enhancement: CFG on the mid feature")
    score_at: Literal["next", "current"] = Field(
        "next", description="score candidates z_s at s (next) or, as LPO does, at the current t")

    @model_validator(mode="after")
    def _check(self) -> RewardSpec:
        if self.kind == "pixel" and not self.scorer:
            raise ValueError("rl.reward.scorer is required when rl.reward.kind is pixel")
        if self.scorer is not None and self.scorer not in PIXEL_SCORER_NAMES:
            raise ValueError(f"rl.reward.scorer: unknown pixel scorer {self.scorer!r}; known: {list(PIXEL_SCORER_NAMES)}")
        return self


class RLSpec(_Strict):
    init_from: str | None = Field(None, description="stage-1 checkpoint folder (or run dir: its latest); "
                                  "null: start from the teacher, with a warning event")
    reward: RewardSpec = Field(default_factory=RewardSpec)
    timesteps: list[int] | Literal["all"] | None = Field(
        None, description="steps of S with RL candidates; default the high-noise steps S[:2] "
        "([999, 749] for K=4, [999, 874] for K=8); 'all': every step but the deterministic last")
    num_candidates: int = Field(4, ge=2, le=64, description="k candidates z_s per shared z_t")
    beta: float = Field(500.0, gt=0, description="beta of Eq. (12); LPO's 500 with element-mean log-probs")
    threshold_min: float = Field(RL_THRESHOLD_SDXL[0], ge=-1, le=1)
    threshold_max: float = Field(RL_THRESHOLD_SDXL[1], ge=-1, le=1,
                                 description="pair kept when softmax gap p_w - p_l exceeds the threshold, "
                                 "interpolated by the transition std from min (low noise) to max (high noise)")
    ratio: int = Field(5, ge=1, le=1000, description="RL updates per distillation update (Table 4: 5:1)")
    joint: bool = Field(True, description="false: post-train RL only (no distillation updates)")
    ratio_clip: float | None = Field(None, gt=0, lt=1, description="LPO/SPO clamp of each ratio to "
                                     "[1-c, 1+c] (LPO: 0.1); null: Eq. (13) as written")
    batch_size: int | None = Field(None, ge=1, le=4096, description="prompts per RL update; default train.batch_size")
    critic_updates: Literal["every", "distill_only"] = Field(
        "every", description="every: the fake score and D update every iteration (Alg. 1 lines 20-26); "
        "distill_only: only on distillation turns")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="a separate AdamW for L_rl")

    @model_validator(mode="after")
    def _check(self) -> RLSpec:
        if self.threshold_min > self.threshold_max:
            raise ValueError("rl.threshold_min must not exceed rl.threshold_max")
        return self


class RLJob(DistillJob):
    """Stage 2: G and the fake score from a stage-1 checkpoint, N RL updates per distillation update."""

    kind: Literal["rl"] = "rl"  # type: ignore[assignment]
    rl: RLSpec = Field(default_factory=RLSpec)

    @model_validator(mode="after")
    def _rl_steps(self) -> RLJob:
        ts = self.schedule.timesteps
        if len(ts) < 2:
            raise ValueError("rl needs schedule.num_steps >= 2: the last step is deterministic and has no RL term")
        steps = self.rl.timesteps
        if steps is None:
            steps = ts[: min(2, len(ts) - 1)]
        elif steps == "all":
            steps = ts[:-1]
        if not steps:
            raise ValueError("rl.timesteps must not be empty")
        bad = [t for t in steps if t not in ts]
        if bad:
            raise ValueError(f"rl.timesteps {bad} are not in schedule.timesteps {ts}")
        if ts[-1] in steps:
            raise ValueError(f"rl.timesteps must not contain the last step {ts[-1]}: it is deterministic, "
                             "so Eq. (13) has no density there")
        self.rl.__dict__["timesteps"] = sorted(set(steps), reverse=True)
        return self


JobSpec = Annotated[DistillJob | RLJob, Field(discriminator="kind")]


class SpecError(ValueError):
    """A spec that does not validate; the message names every bad field."""


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not is_union_tag(p))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc or '<spec>'}: {msg}")
    return "\n".join(lines)


def _coerce(value: str) -> Any:
    """`--set` values are YAML scalars or lists: 20, 0.5, 1e-4, true, null, [999, 499]."""
    return load_yaml(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a raw spec dict (before validation)."""
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise SpecError(f"--set {key}: {p} is not a section")
            node = child
        node[parts[-1]] = _coerce(value)
    return raw


def parse_spec(raw: dict[str, Any]) -> Any:
    """A DistillJob, RLJob or EvalJob (trainer/eval_spec.py), by `kind` (default distill)."""
    from trainer.eval_spec import EvalJob
    from trainer.prepare_spec import PrepareJob

    if not isinstance(raw, dict):
        raise SpecError("<spec>: the spec must be a mapping")
    raw = dict(raw)
    raw.setdefault("kind", "distill")
    models: dict[Any, type[BaseModel]] = {"distill": DistillJob, "rl": RLJob, "eval": EvalJob,
                                          "prepare": PrepareJob}
    if not isinstance(raw["kind"], str) or raw["kind"] not in models:  # an object is unhashable: a 422, not a 500
        raise SpecError(f"kind: unknown job kind {raw['kind']!r} (expected 'distill', 'rl', 'eval' or 'prepare')")
    try:
        return models[raw["kind"]].model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def total_steps(spec: Any) -> int:
    """The progress total of a validated job: training steps, or scored checkpoints for an eval job."""
    return spec.total_steps if spec.kind in ("eval", "prepare") else spec.train.max_steps


def num_processes(spec: Any) -> int:
    return 1 if spec.kind in ("eval", "prepare") else spec.train.num_processes


def load_spec(path: str | Path, overrides: list[str] | None = None) -> Any:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: not valid YAML/JSON: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise SpecError(f"{path}: <spec>: the spec must be a mapping, got {type(raw).__name__}")
    return parse_spec(apply_overrides(raw or {}, overrides or []))
