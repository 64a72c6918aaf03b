"""One `Settings` object for the API, the worker and the CLI (DESIGN §2).

Every value comes from a `FLASHDMD_*` environment variable. Only the URLs differ
between the embedded mode (`flashdmd up`: SQLite and a filesystem broker under
the data dir) and production (Postgres and Redis), so the code path is the same.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_paths(value: Any) -> Any:
    """Accept a JSON list or a comma/colon separated string, as people write both in env files."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return [p for p in text.replace(os.pathsep, ",").split(",") if p.strip()]


log = logging.getLogger(__name__)
# Names that still work for one release; each maps to the setting that replaces it.
DEPRECATED = {"FLASHDMD_GENERATE_WARM_SIZES": "FLASHDMD_GENERATE_WARM_SHAPES",
              "FLASHDMD_GENERATE_WARM_BATCHES": "FLASHDMD_GENERATE_WARM_SHAPES"}


class WarmShape(NamedTuple):
    """One warm-up shape. None: the checkpoint's training size, or (batch) the service's default batches."""

    width: int | None
    height: int | None
    batch: int | None


def parse_shape(text: str, setting: str = "FLASHDMD_GENERATE_WARM_SHAPES") -> WarmShape:
    """WIDTHxHEIGHT or WIDTHxHEIGHTxBATCH (a batch left out is None)."""
    parts = text.strip().lower().split("x")
    if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{setting}: {text!r} is not WIDTHxHEIGHT or WIDTHxHEIGHTxBATCH")
    width, height, *batch = (int(p) for p in parts)
    return WarmShape(width, height, batch[0] if batch else None)


def _legacy_warm_shapes(sizes: str | None, batches: str | None) -> list[WarmShape]:
    """FLASHDMD_GENERATE_WARM_SIZES x WARM_BATCHES (deprecated) as warm shapes: every size at every batch."""
    sized = [parse_shape(t, "FLASHDMD_GENERATE_WARM_SIZES") for t in (sizes or "").split(",") if t.strip()]
    if any(s.batch is not None for s in sized):
        raise ValueError("FLASHDMD_GENERATE_WARM_SIZES takes WIDTHxHEIGHT only (FLASHDMD_GENERATE_WARM_SHAPES "
                         "takes a batch)")
    counts: list[int | None] = []
    for part in (batches or "").split(","):
        if part.strip():
            if not part.strip().isdigit() or int(part) < 1:
                raise ValueError(f"FLASHDMD_GENERATE_WARM_BATCHES: {part.strip()!r} is not a positive integer")
            counts.append(int(part))
    return [WarmShape(s.width, s.height, b) for s in sized or [WarmShape(None, None, None)] for b in counts or [None]
            if s.width is not None or b is not None]


PathList = Annotated[list[Path], NoDecode]
StrList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLASHDMD_", extra="ignore")

    data_dir: Path = Field(Path("~/.flashdmd"), description="embedded database, broker folder and token")
    database_url: str = Field("", description="default: sqlite:///<data_dir>/flashdmd.db")
    broker_url: str = Field("", description="default: filesystem:// (a folder under data_dir)")
    storage_root: Path | None = Field(None, description="runs live in <storage_root>/jobs/<id>/")
    allowed_model_roots: PathList = Field(default_factory=list, description="folders (comma- or colon-separated, "
                                          "or a JSON list) whose teachers and checkpoints specs and /generate may read")
    allowed_data_roots: PathList = Field(default_factory=list, description="folders whose datasets specs may read")

    token: str | None = Field(None, description="bootstrap token for `flashdmd up`")
    token_prefix: str = Field("fdmd_", description="prefix of the tokens `flashdmd token create` makes")

    queue: str = Field("train", description="prefix of the Celery queues: pool P consumes <queue>-<P>")
    # Pools and routing (api/workers.py, deploy/README.md "Pools and routing").
    pools: StrList = Field(default_factory=list, description="pools that count as present even with no "
                           "live worker (e.g. gpu1,gpu8 scaled to zero); `flashdmd up` declares its own")
    worker_gpus: int | None = Field(None, ge=0, description="this worker's GPUs (default: torch's count)")
    worker_processes: int | None = Field(None, ge=1, le=1024, description="processes one job may run "
                                         "here: default 1 on a CPU worker, the GPU count on a GPU worker")
    heartbeat_seconds: float = Field(10.0, gt=0, description="how often a worker heartbeats its running job")
    stale_after_seconds: float = Field(60.0, gt=0, description="a job whose heartbeat is older is recovered "
                                       "by the reaper (at least twice heartbeat_seconds)")
    cancel_grace_seconds: float = Field(60.0, ge=0, description="after a cancel, how long the trainer may take "
                                        "to checkpoint before SIGTERM, then SIGKILL")
    reaper_interval_seconds: float = Field(10.0, ge=0, description="0 turns the API's reaper thread off")
    max_recoveries: int = Field(3, ge=0, description="requeues after a lost worker before the job fails")
    # Redis redelivers an unacked (acks_late) message after this long, even while the first copy still runs.
    # The atomic claim makes such a copy a no-op, and the reaper (not redelivery) recovers lost workers,
    # so this only bounds how long a message taken by a worker that died before claiming waits.
    visibility_timeout_seconds: int = Field(3600, ge=60, description="Redis redelivers an unacknowledged task "
                                            "after this long")
    ingest_poll_seconds: float = Field(0.5, gt=0, description="how often the worker moves a run's metrics and "
                                       "events into the database")
    stream_poll_seconds: float = Field(1.0, gt=0, le=60, description="how often GET /jobs/{id}/stream reads the "
                                       "database for news (one short read session per poll)")
    accelerate_config: Path | None = Field(None, description="an accelerate config file for the "
                                           "trainer's `accelerate launch` (unset: --multi_gpu)")

    # Quotas: what one token may hold at once. Checked at POST /jobs.
    max_active_jobs_per_owner: int = Field(
        10, ge=0, description="jobs of one token not yet finished (queued, running, recovering...); 0: no limit")
    max_train_steps: int = Field(
        1_000_000, ge=1, le=2**31 - 1, description="the largest train.max_steps a job may ask for")

    # -- Edge limits, database waits and /generate fairness --
    # Bodies are counted while they stream (api/edge.py); every JSON body we accept is a few KB.
    max_body_bytes: int = Field(2**20, ge=1024, description="largest request body; a bigger one gets 413")
    # How long an API request waits for SQLite's write lock before it answers 503 (transactions are short,
    # so a long wait means overload, and a quick 503 + Retry-After beats holding a thread).
    sqlite_busy_timeout_ms: int = Field(3_000, ge=0, description="API requests: wait for SQLite's write lock, "
                                        "then 503 (README \"Waits and timeouts\")")
    db_retry_after_seconds: int = Field(5, ge=1, description="Retry-After on 503 when the database is busy or down")
    # -- Every wait on the database is bounded (README "Waits and timeouts"). A locked or unresponsive database
    # answers a request with 503 + Retry-After within about connect + lock (or statement) timeout: 4 s here. --
    db_connect_timeout_seconds: int = Field(2, ge=1, le=600, description="Postgres connect_timeout (libpq's "
                                            "minimum is 2 s): a database that accepts and never answers")
    db_statement_timeout_ms: int = Field(4_000, ge=0, description="Postgres statement_timeout on the API's "
                                         "connections (0: none)")
    db_lock_timeout_ms: int = Field(2_000, ge=0, description="Postgres lock_timeout on the API's connections "
                                    "(a table or row lock held elsewhere; 0: none)")
    db_pool_timeout_seconds: float = Field(4.0, gt=0, description="longest wait for a pooled connection")
    # The worker's writes (metrics ingest, heartbeats) are not latency-critical: they may wait longer than a
    # request, and a failure there is retried on the next poll anyway.
    worker_db_statement_timeout_ms: int = Field(60_000, ge=0, description="Postgres statement_timeout on the "
                                                "worker's connections")
    worker_db_lock_timeout_ms: int = Field(30_000, ge=0, description="Postgres lock_timeout on the worker's "
                                           "connections")
    worker_sqlite_busy_timeout_ms: int = Field(30_000, ge=0, description="the worker's wait for SQLite's write lock")
    redispatch_after_seconds: float = Field(
        300.0, gt=0, description="a job still queued this long after its task was sent, and not claimed, is sent "
        "again (the broker may have lost the message); the atomic claim makes extra copies no-ops")
    max_streams_per_token: int = Field(8, ge=1, description="open GET /jobs/{id}/stream per token; more get 429")
    public_base_url: str | None = Field(None, description="e.g. https://flashdmd.example.com: absolute URLs in "
                                        "responses start with it; unset, they are relative (never from Host)")
    http_header_timeout_seconds: float = Field(
        10.0, gt=0, description="a connection must send a request's headers within this long (slow-header "
        "clients are closed); uvicorn's own keep-alive timeout is http_keep_alive_seconds")
    http_keep_alive_seconds: int = Field(5, ge=1, description="idle keep-alive connections close after this")
    generate_owner_share: float = Field(0.5, gt=0, le=1,
                                        description="share of /generate slots (running + waiting) one token may hold")
    generate_rate_per_minute: float = Field(60.0, ge=0, description="/generate requests per token per minute "
                                            "(token bucket; 0 turns it off); past it 429 with Retry-After")
    generate_rate_burst: int = Field(10, ge=1, description="requests a token may send at once before the rate applies")
    # Work, not only size (api/generate_cost.py): images x pixels / training pixels x steps.
    generate_max_work: float = Field(128.0, gt=0, description="the work one /generate may ask for, in images at "
                                     "the checkpoint's training resolution x steps; more is a 422")
    generate_call_timeout_seconds: float = Field(60.0, gt=0, description="wall-clock limit of one sampler call; "
                                                 "past it the call stops, frees its slot and its requests get 503")

    # -- The inference tier (deploy/README.md "Inference tier") --
    role: Literal["all", "control", "inference"] = Field(
        "all", description="what `flashdmd serve` runs: all = control plane with /generate in-process (or "
        "forwarded when inference_url is set); control = forwards /generate; inference = only /generate and health")
    inference_url: str | None = Field(None, description="the inference service (e.g. http://flashdmd-inference) "
                                      "that the control plane forwards POST /generate to; unset: in-process")
    inference_timeout_seconds: float = Field(120.0, gt=0, description="longest wait for the inference service's "
                                             "answer (it queues up to generate_queue_timeout_seconds itself)")
    inference_connect_timeout_seconds: float = Field(5.0, gt=0, description="longest wait to connect to the "
                                                     "inference service")
    inference_max_connections: int = Field(100, ge=1, description="pooled connections to the inference service")
    inference_retry_after_seconds: int = Field(5, ge=1, description="Retry-After when the inference tier is down")
    generate_warm: StrList = Field(default_factory=list, description="checkpoints (absolute paths or job ids) the "
                                   "inference role loads and runs once per warm shape before /readyz says ready")
    generate_warm_shapes: StrList = Field(default_factory=list, description="WIDTHxHEIGHT or WIDTHxHEIGHTxBATCH, "
                                          "comma-separated: the sizes and batches warmed (and compiled) when a "
                                          "pipeline loads, and one warm-up sampler call each on the inference role "
                                          "(default: the checkpoint's own size; batches max_batch with a fixed "
                                          "batch, else 1 and max_batch)")
    generate_warm_retry_seconds: float = Field(10.0, gt=0, description="retry a failed warm-up after this long "
                                               "(a checkpoint may still be copying onto the volume)")
    # -- POST /generate: admission, request bounds and dynamic batching (api/routes/generate.py) --
    generate_max_concurrency: int = Field(1, ge=1, description="generations running at once (1 per GPU)")
    # max_concurrency + max_queue must hold a full batch per slot, or the batcher can never fill one: the default
    # 16 admits 17 requests for 1 slot of max_batch 8 (a warning at start names an inconsistent setting).
    generate_max_queue: int = Field(16, ge=0, description="requests waiting for a slot; more get 503")
    generate_queue_timeout_seconds: float = Field(60.0, gt=0, description="longest wait for a slot, then 503")
    generate_retry_after_seconds: int = Field(5, ge=1, description="Retry-After of /generate's 503s")
    generate_max_images: int = Field(4, ge=1, le=64, description="num_images one request may ask for")
    generate_max_prompt_chars: int = Field(2000, ge=1, description="longest prompt")
    generate_max_side: int = Field(2048, ge=16, description="pixels, per side")
    generate_max_pixels: int = Field(4 * 1024 * 1024, ge=256, description="num_images x width x height per request")
    generate_cache_bytes: int = Field(8 * 2**30, ge=1, description="memory budget of the loaded-pipeline cache "
                                      "on the CPU")
    generate_device: str | None = Field(None, description="default: cuda if available, else cpu")
    generate_dtype: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="generator and text-encoder dtype (default: bf16 on cuda, fp32 on cpu)")
    # Dynamic batching (api/batcher.py): concurrent requests with the same checkpoint, size, steps and guidance
    # share one sampler call. max_batch 1 turns it off.
    generate_max_batch: int = Field(8, ge=1, le=64, description="images per sampler call")
    generate_max_wait_ms: float = Field(10.0, ge=0, le=10_000,
                                        description="how long a request waits for others to share its call")
    generate_fixed_batch: bool | None = Field(
        None, description="pad every sampler call to max_batch rows, so an image's bytes never depend on the "
                          "requests it was batched with (default: on for the CPU; on GPUs the rows agree to a "
                          "tolerance and padding would cost latency at low load)")
    # -- Serving options of /generate (inference/serving.py ServingOptions). Unset: the checkpoint's
    # serving.json (what `flashdmd export` wrote), then the device's default. --
    generate_vae_dtype: Literal["fp32", "fp16", "bf16"] | None = Field(
        None, description="VAE dtype (default: bf16 on cuda, fp32 on cpu; SDXL's VAE overflows in fp16)")
    generate_compile: bool | None = Field(None, description="torch.compile the denoiser for the warm shapes "
                                          "at warm-up (default off)")
    generate_compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = (
        Field(None, description="torch.compile mode (default: default)"))
    generate_compile_cache_dir: Path | None = Field(
        None, description="inductor's on-disk compile cache, reused across restarts (default <data_dir>/compile-cache)")
    generate_fuse_qkv: bool | None = Field(None, description="fused attention QKV projections (default: on cuda)")
    generate_channels_last: bool | None = Field(None, description="channels-last UNet and VAE (default: on cuda)")
    generate_vae: Literal["full", "tiny"] | None = Field(
        None, description="full: the checkpoint's VAE; tiny: diffusers AutoencoderTiny from generate_tiny_vae_path")
    generate_tiny_vae_path: Path | None = Field(None, description="a local AutoencoderTiny folder (vae=tiny)")
    generate_warm_sizes: str | None = Field(None, description="deprecated: "
                                            "FLASHDMD_GENERATE_WARM_SHAPES (WIDTHxHEIGHT,...; every size at every "
                                            "WARM_BATCHES entry)")
    generate_warm_batches: str | None = Field(None, description="deprecated: "
                                              "FLASHDMD_GENERATE_WARM_SHAPES (rows per call, e.g. 1,4,8)")
    generate_fixed_rows: int | None = Field(
        None, ge=1, le=64, description="rows per sampler call when the batch is fixed (the CPU): a lone request "
        "pays for this many rows and a batch goes in calls of this many (default: generate_max_batch; 1 is "
        "the lowest latency per request, max_batch the most images/s)")
    generate_gpu_memory_fraction: float = Field(0.5, gt=0, le=1, description="on cuda, the pipeline cache's "
                                                "budget as a share of the GPU's memory (generate_cache_bytes "
                                                "is the budget on the CPU)")

    @field_validator("token")
    @classmethod
    def _token_length(cls, value: str | None) -> str | None:
        # 32 characters: a bootstrap token is a password anyone who reaches the port can guess at.
        if value is not None and len(value) < 32:
            raise ValueError("FLASHDMD_TOKEN must have at least 32 characters "
                             "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
        return value

    @field_validator("inference_url", "public_base_url", mode="before")
    @classmethod
    def _unset_if_empty(cls, value: Any) -> Any:
        # compose passes `${FLASHDMD_INFERENCE_URL:-}` as an empty string: that means "in-process", not a URL.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("allowed_model_roots", "allowed_data_roots", "pools", "generate_warm", "generate_warm_shapes",
                     mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        return _split_paths(value)

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        data_dir = self.data_dir.expanduser().absolute()
        updates: dict[str, Any] = {"data_dir": data_dir}
        if not self.database_url:
            updates["database_url"] = f"sqlite:///{data_dir / 'flashdmd.db'}"
        if not self.broker_url:
            updates["broker_url"] = "filesystem://"
        updates["storage_root"] = (self.storage_root or data_dir / "storage").expanduser().absolute()
        # Roots are compared after realpath, so resolve symlinks in the roots themselves too.
        for name in ("allowed_model_roots", "allowed_data_roots"):
            updates[name] = [Path(os.path.realpath(p.expanduser())) for p in getattr(self, name)]
        if self.public_base_url is not None and not self.public_base_url.startswith(("http://", "https://")):
            raise ValueError("FLASHDMD_PUBLIC_BASE_URL must be an http:// or https:// URL")
        if self.inference_url is not None and not self.inference_url.startswith(("http://", "https://")):
            raise ValueError("FLASHDMD_INFERENCE_URL must be an http:// or https:// URL")
        if self.role == "control" and not self.inference_url:
            raise ValueError("FLASHDMD_ROLE=control forwards /generate: set FLASHDMD_INFERENCE_URL")
        for shape in self.generate_warm_shapes:
            parse_shape(shape)
        _legacy_warm_shapes(self.generate_warm_sizes, self.generate_warm_batches)
        for old, new in DEPRECATED.items():
            if getattr(self, old.removeprefix("FLASHDMD_").lower()) is not None:
                message = f"{old} is deprecated and goes in the next release: use {new} (docs/settings.md)"
                warnings.warn(message, DeprecationWarning, stacklevel=2)
                log.warning(message)
        if self.stale_after_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("FLASHDMD_STALE_AFTER_SECONDS must be at least twice FLASHDMD_HEARTBEAT_SECONDS")
        self.__dict__.update(updates)
        return self

    def warm_shapes(self) -> list[WarmShape]:
        """FLASHDMD_GENERATE_WARM_SHAPES, then what the deprecated WARM_SIZES x WARM_BATCHES name."""
        shapes = [s if isinstance(s, tuple) else parse_shape(s) for s in self.generate_warm_shapes]
        return shapes + _legacy_warm_shapes(self.generate_warm_sizes, self.generate_warm_batches)

    @property
    def run_root(self) -> Path:
        assert self.storage_root is not None
        return self.storage_root / "jobs"

    def run_dir(self, job_id: str) -> Path:
        return self.run_root / job_id

    @property
    def is_embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_folder(self) -> Path:
        """The filesystem broker's folder: the URL's path if it has one, else <data_dir>/broker."""
        path = self.broker_url.removeprefix("filesystem://")
        return Path(path) if path else self.data_dir / "broker"

    def db_timeouts(self, role: Literal["api", "worker"] = "api") -> dict[str, int]:
        """make_engine's keyword arguments for the API's or the worker's connections (api/db.py)."""
        if role == "worker":
            return {"busy_timeout_ms": self.worker_sqlite_busy_timeout_ms, "connect_timeout": self.db_connect_timeout_seconds,
                    "statement_timeout_ms": self.worker_db_statement_timeout_ms,
                    "lock_timeout_ms": self.worker_db_lock_timeout_ms}
        return {"busy_timeout_ms": self.sqlite_busy_timeout_ms, "connect_timeout": self.db_connect_timeout_seconds,
                "statement_timeout_ms": self.db_statement_timeout_ms, "lock_timeout_ms": self.db_lock_timeout_ms}

    @property
    def sqlalchemy_url(self) -> str:
        """psycopg 3 is our Postgres driver; plain postgresql:// URLs would ask for psycopg2."""
        url = self.database_url
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url.removeprefix(prefix)
        return url
