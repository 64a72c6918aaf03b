"""The `kind: prepare` job spec: encode a data source once into a cache that `data.cache` reads.

Like the rest of trainer/jobspec/, this imports only pydantic, so the API validates prepare specs without torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainer.jobspec.base import Strict
from trainer.jobspec.data import BucketSpec
from trainer.jobspec.limits import SEED_MAX
from trainer.jobspec.model import ModelSpec


class PrepareSpec(Strict):
    source: str = Field(min_length=1, description="an image folder, a .jsonl, webdataset .tar shards (a glob or "
                        "brace pattern), a datasets save_to_disk folder or .parquet files")
    output: str | None = Field(None, description="the cache folder; default RUN_DIR/cache")
    buckets: BucketSpec = Field(default_factory=BucketSpec, description="as the training spec's data.buckets")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="random crops: the training spec's train.seed")
    batch_size: int = Field(16, ge=1, le=1024, description="images per VAE call")
    shard_size: int = Field(1024, ge=1, le=1_000_000, description="source images per cache shard (resume unit)")


class PrepareJob(Strict):
    kind: Literal["prepare"] = "prepare"
    name: str | None = Field(None, max_length=200)
    model: ModelSpec
    prepare: PrepareSpec

    @property
    def total_steps(self) -> int:
        """Progress is counted in one unit: the prepare (tqdm shows images/s and the ETA)."""
        return 1
