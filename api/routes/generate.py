"""POST /generate: images from a job's checkpoint with the K-step sampler (DESIGN §5).

Everything is checked before any work starts: the body (pydantic), then the checkpoint
(one of the caller's jobs, or a path that after realpath lies in one of the caller's
own run directories or under the allowed model roots), then steps, size and the pixel
budget against that checkpoint; 422 names the field. The database is read in one short
session closed before any model work. Then the request takes a slot (api/generate_limits.py):
at most `generate_max_concurrency` run at once and `generate_max_queue` wait; anyone
beyond that, or waiting longer than the timeout, gets 503 with Retry-After at once, so
a burst never piles up work or memory; a token past its share of slots or its rate gets 429.
Admitted requests go to the batcher (api/batcher.py): requests for the same checkpoint, size, steps and
guidance that arrive within `generate_max_wait_ms` share one sampler call of up to `generate_max_batch`
images, and `generate_max_concurrency` calls run at once. Loading, sampling and encoding run in worker
threads, never on the event loop; loaded pipelines live in an LRU cache bounded by `generate_cache_bytes` on
the CPU and by `generate_gpu_memory_fraction` of the GPU on cuda, built with the serving options
(inference/serving.py: dtype, fused QKV, channels-last, compile, VAE choice; FLASHDMD_GENERATE_*).

torch and the inference code are imported on the first request, so the API starts
(and serves /jobs) without loading them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api import crud, generate_cost, generate_deadline
from api.batcher import Batcher, QueueTimeout
from api.deps import CurrentToken, SettingsDep
from api.errors import APIError
from api.generate_limits import Busy, Limiter, RateLimited
from api.observability import GenerateMetrics
from api.schemas import ErrorBody
from api.schemas_generate import GeneratedImage, GenerateRequest, GenerateResponse, GenerateSettings
from api.settings import Settings
from trainer.roots import under_root

T = TypeVar("T")
log = logging.getLogger(__name__)
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
errors = {code: {"model": ErrorBody} for code in (401, 404, 409, 413, 422, 429, 503)}
__all__ = ["Busy", "Limiter", "RateLimited", "router", "runtime"]
router = APIRouter(tags=["generate"], responses=errors)  # type: ignore[arg-type]


Row = tuple[str, int]  # (prompt, seed): one image of a request
# (checkpoint folder, width, height, steps as asked, guidance, negative prompt): what one sampler call shares.
BatchKey = tuple[str, int, int, int | None, float, str | None]


class Runtime:
    """Per-app state: the limiter, the batcher, and the pipeline cache (built in a worker thread on first use,
    as it imports torch)."""

    def __init__(self, gs: GenerateSettings, settings: Settings, metrics: GenerateMetrics | None = None) -> None:
        self.settings = gs
        self.app_settings = settings
        self.limiter = Limiter(gs.generate_max_concurrency, gs.generate_max_queue,
                               gs.generate_queue_timeout_seconds, gs.generate_retry_after_seconds,
                               owner_share=settings.generate_owner_share,
                               per_minute=settings.generate_rate_per_minute, burst=settings.generate_rate_burst,
                               work_capacity=settings.generate_max_work * gs.generate_max_concurrency)
        if gs.generate_max_concurrency + gs.generate_max_queue < gs.generate_max_concurrency * gs.generate_max_batch:
            log.warning("FLASHDMD_GENERATE_MAX_QUEUE=%d admits fewer requests than one full batch (%d) per slot: "
                        "the batcher can never fill a batch", gs.generate_max_queue, gs.generate_max_batch)
        self._cache: Any = None
        self._lock = threading.Lock()
        self.batcher: Batcher[Row, Any] = Batcher(self._sample, max_batch=gs.generate_max_batch,
                                                  max_wait=gs.generate_max_wait_ms / 1000.0,
                                                  workers=gs.generate_max_concurrency, metrics=metrics)
        if metrics is not None:
            metrics.cache.stats = self._cache_stats

    def _cache_stats(self) -> tuple[int, int]:
        cache = self._cache
        return (0, 0) if cache is None else (cache.stats.hits, cache.stats.loads)

    def _sample(self, key: Any, rows: list[Row]) -> list[Any]:
        """One sampler call (in a worker thread): uint8 images [H, W, 3], one per row, in order."""
        path, width, height, steps, guidance, negative = key
        pipe = self.cache().get(path)
        fixed = self.settings.generate_fixed_batch
        if fixed is None:
            fixed = pipe.device.type == "cpu"  # see FewStepPipeline.generate_rows
        generate_deadline.install(pipe)
        # The wall-clock limit starts with the call (loading is bounded by the cache, not by this).
        with generate_deadline.deadline(self.app_settings.generate_call_timeout_seconds):
            images = pipe.generate_rows([p for p, _ in rows], [s for _, s in rows], steps=steps, width=width,
                                        height=height, guidance=guidance, negative_prompt=negative,
                                        pad_to=self.fixed_rows() if fixed else None)
        return list(images)

    def fixed_rows(self) -> int:
        rows = self.app_settings.generate_fixed_rows
        return self.settings.generate_max_batch if rows is None else min(rows, self.settings.generate_max_batch)

    def serving_options(self, device: str) -> Any:
        """The operator's serving options (inference.serving.ServingOptions); unset fields fall back to the
        checkpoint's serving.json and then the device's defaults when a pipeline loads. Raises ServingError
        (naming the FLASHDMD_GENERATE_* setting) for an impossible combination."""
        from dataclasses import replace

        from inference.serving import ServingOptions

        s = self.app_settings
        options = ServingOptions.from_settings(s, self.settings)
        if options.compile_cache_dir is None:
            options = replace(options, compile_cache_dir=s.data_dir / "compile-cache")
        options.check(device.startswith("cuda"))
        return options

    def cache(self) -> Any:
        with self._lock:
            if self._cache is None:
                import torch

                from inference.cache import PipelineCache
                from inference.checkpoint import CheckpointInfo
                from inference.pipeline import estimate_bytes, load_pipeline
                from inference.serving import ServingOptions, cache_budget_bytes, torch_dtype

                gs = self.settings
                device = gs.generate_device or ("cuda" if torch.cuda.is_available() else "cpu")
                options = self.serving_options(device)
                fixed = gs.generate_fixed_batch if gs.generate_fixed_batch is not None else device == "cpu"
                # Every call has max_batch rows with a fixed batch; else lone requests and full batches matter.
                warm = (self.fixed_rows(),) if fixed else (1, gs.generate_max_batch)
                defaults = ServingOptions(warm_batches=warm)
                dtype = torch_dtype(options.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
                self._cache = PipelineCache(
                    cache_budget_bytes(device, gs.generate_cache_bytes, self.app_settings.generate_gpu_memory_fraction),
                    lambda path: load_pipeline(Path(str(path)), device=device, options=options,
                                               service_defaults=defaults),
                    lambda pipe: pipe.nbytes,
                    estimate=lambda path: estimate_bytes(CheckpointInfo.load(Path(str(path))), dtype))
            return self._cache


def runtime(app: FastAPI) -> Runtime:
    # Created in the event loop with no await in between, so two first requests cannot both create one.
    rt = getattr(app.state, "generate_runtime", None)
    if rt is None:
        gs = getattr(app.state, "generate_settings", None) or GenerateSettings()
        obs = getattr(app.state, "observability", None)
        rt = app.state.generate_runtime = Runtime(gs, app.state.settings, obs.generate if obs else None)
    return rt


async def _hold(fn: Callable[[], T]) -> T:
    """Run fn in a thread; if the request is cancelled, keep its slot until the thread is done."""
    task = asyncio.ensure_future(run_in_threadpool(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _invalid(message: str, *fields: str) -> APIError:
    return APIError("invalid_request", message, fields=list(fields))


def _not_allowed() -> APIError:
    # One message for every refused path, whether or not something exists there (no existence oracle).
    return APIError("path_not_allowed", "checkpoint: must be an absolute path to a checkpoint of one of your jobs "
                    "or under the allowed model roots", fields=["checkpoint"])


def _reachable(real: str, *, settings: Settings, owns_job: Callable[[str], bool]) -> bool:
    """May the caller read this realpath? Inside the run root only their own jobs' folders, whatever model
    roots also cover it (an operator may well list the storage root); elsewhere, the allowed model roots."""
    run_root = os.path.realpath(settings.run_root)
    if under_root(real, [run_root]):
        parts = Path(os.path.relpath(real, run_root)).parts
        return bool(parts) and parts[0] != ".." and owns_job(parts[0])
    return under_root(real, settings.allowed_model_roots)


def _checkpoint_dir(body: GenerateRequest, session: Session, token: Any, settings: Settings) -> Path:
    from inference.checkpoint import CheckpointError, resolve_checkpoint_dir

    def owns(job_id: str) -> bool:
        return crud.owns_job(session=session, owner=token, job_id=job_id)

    if body.job is not None:
        job = crud.get_job(session=session, owner=token, job_id=body.job)
        run_dir = os.path.realpath(settings.run_dir(job.id))
        done = [Path(os.path.realpath(os.path.join(run_dir, c.path)))
                for c in crud.list_checkpoints(session=session, job_id=job.id)]
        done = [p for p in done if p != Path(run_dir) and under_root(p, [run_dir]) and (p / "meta.json").is_file()]
        if not done:
            raise APIError("invalid_state", f"job {job.id} has no checkpoint yet", fields=["job"])
        return done[-1]
    assert body.checkpoint is not None
    value = body.checkpoint
    # No `..` at all: realpath resolves it after following the links before it, so its result could tell
    # whether a path outside the roots holds a symlink. No legitimate checkpoint path needs one.
    if "\x00" in value or not os.path.isabs(value) or ".." in Path(value).parts:
        raise _not_allowed()
    # realpath first: symlinks are judged by where they lead, not by how the path is spelled.
    real = os.path.realpath(value)
    if not _reachable(real, settings=settings, owns_job=owns):
        raise _not_allowed()
    try:
        found = os.path.realpath(resolve_checkpoint_dir(real))
    except CheckpointError as err:  # inside a root the caller may read: saying what is wrong leaks nothing
        raise _invalid(f"checkpoint: {err}", "checkpoint") from None
    # The step folder chosen inside a run directory may itself be a symlink: judge where it leads too.
    if not _reachable(found, settings=settings, owns_job=owns):
        raise _not_allowed()
    return Path(found)


def _validate(body: GenerateRequest, gs: GenerateSettings, sessions: sessionmaker[Session], token: Any,
              settings: Settings) -> tuple[Any, list[int], tuple[int, int], float]:
    """Everything about the request that can be checked without weights: (info, timesteps, (w, h)).

    Runs in one short read-only session that is closed before any model work starts, so a
    generation never holds a database transaction (on SQLite that held the write lock).
    """
    from inference.checkpoint import CheckpointError, CheckpointInfo

    with sessions() as session:
        path = _checkpoint_dir(body, session, token, settings)
    try:
        info = CheckpointInfo.load(path)
        ts = info.timesteps_for(body.steps)
        size = info.check_size(body.width, body.height, gs.generate_max_side)
    except CheckpointError as err:
        raise _invalid(f"{err.field}: {err}", err.field) from None
    if body.num_images * size[0] * size[1] > gs.generate_max_pixels:
        raise _invalid(f"num_images: {body.num_images} images of {size[0]}x{size[1]} exceed the "
                       f"{gs.generate_max_pixels} pixels one request may ask for", "num_images")
    work = generate_cost.estimate(num_images=body.num_images, width=size[0], height=size[1], steps=len(ts),
                                  resolution=info.resolution, default_steps=len(info.timesteps))
    if work.units > settings.generate_max_work:
        raise _invalid(work.describe(settings.generate_max_work), *work.fields)
    return info, ts, size, work.units


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": {
    "image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "one image: its bytes, with X-Seed and "
    "X-Checkpoint headers; several: JSON with base64 images and their seeds"}})
async def generate(body: GenerateRequest, request: Request, token: CurrentToken, settings: SettingsDep) -> Any:
    """Generate images with a checkpoint's K-step sampler. The same seed gives the same bytes."""
    rt = runtime(request.app)
    gs = rt.settings
    if (body.checkpoint is None) == (body.job is None):
        raise _invalid("give exactly one of checkpoint or job", "checkpoint", "job")
    if len(body.prompt) > gs.generate_max_prompt_chars:
        raise _invalid(f"prompt: longer than {gs.generate_max_prompt_chars} characters", "prompt")
    if body.negative_prompt and body.guidance_scale <= 1.0:
        raise _invalid("negative_prompt: has no effect without guidance_scale > 1 (the generator runs without "
                       "CFG)", "negative_prompt")
    if body.num_images > gs.generate_max_images:
        raise _invalid(f"num_images: at most {gs.generate_max_images}", "num_images")
    sessions = request.app.state.read_sessionmaker
    info, _, (width, height), work = await run_in_threadpool(_validate, body, gs, sessions, token, settings)
    seed = secrets.randbits(31) if body.seed is None else body.seed
    seeds = [seed + i for i in range(body.num_images)]

    key: BatchKey = (str(info.path), width, height, body.steps, body.guidance_scale,
                     body.negative_prompt if body.guidance_scale != 1.0 else None)

    def encode(images: list[Any]) -> list[bytes]:
        from inference.images import encode_image

        return [encode_image(img, body.format) for img in images]

    from inference.checkpoint import CheckpointError
    from inference.serving import ServingError

    limiter = rt.limiter
    try:
        async with limiter.place(token.id, work):
            try:
                images = await rt.batcher.submit(key, [(body.prompt, s) for s in seeds], limiter.timeout)
            except QueueTimeout:
                raise limiter.busy(f"no generation slot within {limiter.timeout:g} s") from None
    except generate_deadline.GenerationTimeout as err:  # the call was stopped; its slot is already free
        raise APIError("generation_timeout", f"{err} (FLASHDMD_GENERATE_CALL_TIMEOUT_SECONDS); ask for less work",
                       headers={"Retry-After": str(gs.generate_retry_after_seconds)}) from None
    except CheckpointError as err:  # e.g. the teacher the checkpoint names cannot be loaded
        raise _invalid(f"{err.field}: {err}", err.field) from None
    except ServingError as err:
        # The checkpoint's own serving.json is the request's input (422); an operator's FLASHDMD_GENERATE_*
        # combination that cannot work is the server's state (503), never a 500 with a traceback.
        if err.setting == "serving.json":
            raise _invalid(f"checkpoint: {err}", "checkpoint") from None
        raise APIError("not_ready", f"generation is misconfigured on this server ({err})",
                       headers={"Retry-After": str(gs.generate_retry_after_seconds)}) from None
    encoded = await _hold(lambda: encode(images))
    steps = len(info.timesteps_for(body.steps))
    if len(encoded) == 1:
        return Response(encoded[0], media_type=MEDIA_TYPES[body.format],
                        headers={"X-Seed": str(seed), "X-Checkpoint": info.id, "X-Steps": str(steps)})
    b64 = await run_in_threadpool(lambda: [base64.b64encode(e).decode("ascii") for e in encoded])
    return GenerateResponse(checkpoint=info.id, steps=steps, width=width, height=height, format=body.format,
                            images=[GeneratedImage(seed=s, media_type=MEDIA_TYPES[body.format], data=d)
                                    for s, d in zip(seeds, b64, strict=True)])
