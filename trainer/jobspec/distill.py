"""Stage 1, `kind: distill`: the distillation section, its discriminator, and the job that joins every section.

DistillJob holds the rules that read more than one section (sharding against the optimiser, LoRA and stage 2,
the bf16 levers against mixed precision, the GAN against prompt-only data): they are written here once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from trainer.jobspec.base import Strict
from trainer.jobspec.data import DataSpec
from trainer.jobspec.limits import SAM_DEPTH
from trainer.jobspec.model import ModelSpec
from trainer.jobspec.train import MemorySpec, OptimSpec, ScheduleSpec, TrainSpec

# Real-score CFG defaults per family (DESIGN §3; DMD2 uses 8 for SDXL, 1.75 for SD1.5).
DEFAULT_REAL_GUIDANCE: dict[str, float] = {"sdxl": 8.0, "sd15": 1.75, "sd3": 4.0}
# Global-attention block indices of the SAM encoders (segment-anything build_sam.py).
SAM_GLOBAL_BLOCKS: dict[str, list[int]] = {
    "vit_b": [2, 5, 8, 11],
    "vit_l": [5, 11, 17, 23],
    "vit_h": [7, 15, 23, 31],
    "tiny": [1, 3],
}


class DiscriminatorSpec(Strict):
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


class DistillSpec(Strict):
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



class DistillJob(Strict):
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

