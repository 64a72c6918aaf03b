"""The `data` section: one training data source, and the aspect-ratio buckets it is batched by."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trainer.jobspec.base import Strict


class BucketSpec(Strict):
    """Aspect-ratio buckets (trainer/buckets.py): each batch has one size; SDXL gets per-sample size/crop ids."""

    enabled: bool = False
    sizes: Literal["sdxl"] | list[tuple[int, int]] | None = Field(
        None, description="'sdxl' (SDXL's 41 sizes) or [[height, width], ...]; default: derived from target_pixels")
    target_pixels: int | None = Field(None, ge=64, le=16 * 2**20, description="pixels per bucket; default "
                                      "model.resolution squared")
    step: int = Field(64, ge=1, le=1024, description="derived buckets: sides are multiples of this")
    crop: Literal["center", "random"] = Field("center", description="random: seeded per sample (train.seed)")


class DataSpec(Strict):
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

