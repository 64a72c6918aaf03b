"""POST /generate: request/response bodies and the route's settings.

The settings read the same `FLASHDMD_*` environment as `api.settings.Settings`, with
field names that can move into it unchanged (`generate_max_concurrency` <->
FLASHDMD_GENERATE_MAX_CONCURRENCY); they live here until api/settings.py takes them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ImageFormat = Literal["png", "jpeg", "webp"]
MAX_SEED = 2**63 - 1 - 1024  # image i uses seed + i, which must stay a valid torch seed


class GenerateSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLASHDMD_", extra="ignore")

    generate_max_concurrency: int = Field(1, ge=1, description="generations running at once (1 per GPU)")
    # max_concurrency + max_queue must hold a full batch per slot, or the batcher can never fill one: the default
    # 16 admits 17 requests for 1 slot of max_batch 8 (a warning at start names an inconsistent setting).
    generate_max_queue: int = Field(16, ge=0, description="requests waiting for a slot; more get 503")
    generate_queue_timeout_seconds: float = Field(60.0, gt=0, description="longest wait for a slot, then 503")
    generate_retry_after_seconds: int = Field(5, ge=1)
    generate_max_images: int = Field(4, ge=1, le=64)
    generate_max_prompt_chars: int = Field(2000, ge=1)
    generate_max_side: int = Field(2048, ge=16, description="pixels, per side")
    generate_max_pixels: int = Field(4 * 1024 * 1024, ge=256, description="num_images x width x height per request")
    generate_cache_bytes: int = Field(8 * 2**30, ge=1, description="memory budget of the loaded-pipeline cache")
    generate_device: str | None = Field(None, description="default: cuda if available, else cpu")
    generate_dtype: Literal["fp32", "fp16", "bf16"] | None = Field(None, description="default: bf16 on cuda")
    # Dynamic batching (api/batcher.py): concurrent requests with the same checkpoint, size, steps and guidance
    # share one sampler call. max_batch 1 turns it off.
    generate_max_batch: int = Field(8, ge=1, le=64, description="images per sampler call")
    generate_max_wait_ms: float = Field(10.0, ge=0, le=10_000,
                                        description="how long a request waits for others to share its call")
    generate_fixed_batch: bool | None = Field(
        None, description="pad every sampler call to max_batch rows, so an image's bytes never depend on the "
                          "requests it was batched with (default: on for the CPU; on GPUs the rows agree to a "
                          "tolerance and padding would cost latency at low load)")


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
