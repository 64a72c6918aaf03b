"""The `model` section: the teacher to distil and the optional LoRA on the student."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from trainer.jobspec.base import Strict
from trainer.jobspec.limits import TINY_FAMILIES, TOY_MODELS


class LoraSpec(Strict):
    rank: int = Field(64, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0)
    target_modules: list[str] | None = None  # None: the family's attention projections
    dropout: float = Field(0.0, ge=0, lt=1)


class ModelSpec(Strict):
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

