"""POST /generate: request and response bodies (its settings are `api.settings.Settings.generate_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ImageFormat = Literal["png", "jpeg", "webp"]
MAX_SEED = 2**63 - 1 - 1024  # image i uses seed + i, which must stay a valid torch seed


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"job": "j_0123456789abcdef", "prompt": "a handwritten digit seven", "seed": 7, "num_images": 1}]})

    checkpoint: str | None = Field(None, description="checkpoint folder (or run directory) under the storage or "
                                                     "allowed model roots; give this or `job`")
    job: str | None = Field(None, min_length=1, max_length=64, description="a job id: its latest checkpoint")
    prompt: str = Field(min_length=1, max_length=100_000)
    negative_prompt: str | None = Field(None, max_length=100_000,
                                        description="used only with guidance_scale > 1")
    num_images: int = Field(1, ge=1, le=64, description="image i uses seed + i")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: random, returned in X-Seed")
    steps: int | None = Field(None, ge=1, le=1000, description="default: the checkpoint's own K")
    width: int | None = Field(None, ge=1, le=1_000_000, description="default: the training resolution")
    height: int | None = Field(None, ge=1, le=1_000_000)
    format: ImageFormat = "png"
    guidance_scale: float = Field(1.0, ge=1.0, le=30.0,
                                  description="CFG; the generator is distilled to run without it (1)")


class GeneratedImage(BaseModel):
    seed: int
    media_type: str
    data: str = Field(description="base64 of the encoded image")


class GenerateResponse(BaseModel):
    """The body when num_images > 1 (one image comes back as raw bytes with X-Seed/X-Checkpoint headers)."""

    checkpoint: str
    steps: int
    width: int
    height: int
    format: ImageFormat
    images: list[GeneratedImage]
