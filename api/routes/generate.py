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

The checkpoint, steps and size are resolved once, at validation, into a `GenerationPlan` (api/generate_plan.py)
whose `BatchKey` travels through the batcher to the sampler call. torch and the inference code are imported
on the first request (api/generate_runtime.py), so the API starts (and serves /jobs) without loading them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api import crud, generate_cost, generate_deadline
from api.batcher import QueueTimeout
from api.deps import CurrentToken
from api.errors import APIError
from api.generate_limits import Busy, Limiter, RateLimited
from api.generate_plan import GenerationPlan, Row
from api.generate_runtime import Runtime, runtime
from api.schemas import ErrorBody
from api.schemas_generate import GeneratedImage, GenerateRequest, GenerateResponse
from api.settings import Settings
from trainer.roots import under_root

T = TypeVar("T")
log = logging.getLogger(__name__)
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
errors = {code: {"model": ErrorBody} for code in (401, 404, 406, 409, 413, 422, 429, 503)}
__all__ = ["Busy", "Limiter", "RateLimited", "Runtime", "router", "runtime"]
router = APIRouter(tags=["generate"], responses=errors)  # type: ignore[arg-type]


async def _hold(fn: Callable[[], T]) -> T:
    """Run fn in a thread; if the request is cancelled, keep its slot until the thread is done."""
    task = asyncio.ensure_future(run_in_threadpool(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


def _answer_as_json(accept: str | None, media_type: str, num_images: int) -> bool:
    """Content negotiation: JSON (base64 images) or the image's bytes. Without a preference (no Accept, `*/*`, or
    equal weights) one image comes back as bytes and several as JSON, as before negotiation existed; several
    images cannot be one image body, so asking only for an image type then is a 406 naming `num_images`."""
    weights = {"json": -1.0, "image": -1.0}
    for part in (accept or "").split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        kind = kind.lower()
        if kind in ("application/json", "application/*"):
            weights["json"] = max(weights["json"], q)
        elif kind in (media_type, "image/*"):
            weights["image"] = max(weights["image"], q)
        elif kind == "*/*":  # a named type outranks the wildcard at the same q (RFC 9110, 12.5.1: the more specific)
            weights["json"], weights["image"] = max(weights["json"], q * 0.999), max(weights["image"], q * 0.999)
    if not accept or weights["json"] == weights["image"] and weights["json"] > 0:
        return num_images > 1
    if max(weights.values()) <= 0:
        raise APIError("not_acceptable", f"Accept: this endpoint answers {media_type} (one image) or "
                       "application/json", 406, fields=["num_images"])
    if num_images > 1:
        if weights["json"] > 0:
            return True
        raise APIError("not_acceptable", f"num_images: {num_images} images come back as application/json only; "
                       "send Accept: application/json or ask for one image", 406, fields=["num_images"])
    return weights["json"] > weights["image"]


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


def _validate(body: GenerateRequest, settings: Settings, sessions: sessionmaker[Session],
              token: Any) -> GenerationPlan:
    """Everything about the request that can be checked without weights, resolved once into its plan.

    Runs in one short read-only session that is closed before any model work starts, so a
    generation never holds a database transaction (on SQLite that held the write lock).
    """
    from inference.checkpoint import CheckpointError, CheckpointInfo

    with sessions() as session:
        path = _checkpoint_dir(body, session, token, settings)
    try:
        info = CheckpointInfo.load(path)
        ts = tuple(info.timesteps_for(body.steps))
        width, height = info.check_size(body.width, body.height, settings.generate_max_side)
    except CheckpointError as err:
        raise _invalid(f"{err.field}: {err}", err.field) from None
    if body.num_images * width * height > settings.generate_max_pixels:
        raise _invalid(f"num_images: {body.num_images} images of {width}x{height} exceed the "
                       f"{settings.generate_max_pixels} pixels one request may ask for", "num_images")
    work = generate_cost.estimate(num_images=body.num_images, width=width, height=height, steps=len(ts),
                                  resolution=info.resolution, default_steps=len(info.timesteps))
    if work.units > settings.generate_max_work:
        raise _invalid(work.describe(settings.generate_max_work), *work.fields)
    return GenerationPlan(info, ts, width, height, work.units, body.guidance_scale, body.negative_prompt)


@router.post("/generate", response_model=GenerateResponse, responses={200: {"content": {
    "image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "By `Accept`: `image/png` (or the "
    "requested format's type) gives one image's bytes with X-Seed and X-Checkpoint headers; `application/json` "
    "gives base64 images and their seeds. Without a preference: bytes for one image, JSON for several."}})
async def generate(body: GenerateRequest, request: Request, token: CurrentToken) -> Any:
    """Generate images with a checkpoint's K-step sampler. The same seed gives the same bytes."""
    rt = runtime(request.app)
    settings = rt.settings
    if (body.checkpoint is None) == (body.job is None):
        raise _invalid("give exactly one of checkpoint or job", "checkpoint", "job")
    if len(body.prompt) > settings.generate_max_prompt_chars:
        raise _invalid(f"prompt: longer than {settings.generate_max_prompt_chars} characters", "prompt")
    if body.negative_prompt and body.guidance_scale <= 1.0:
        raise _invalid("negative_prompt: has no effect without guidance_scale > 1 (the generator runs without "
                       "CFG)", "negative_prompt")
    if body.num_images > settings.generate_max_images:
        raise _invalid(f"num_images: at most {settings.generate_max_images}", "num_images")
    as_json = _answer_as_json(request.headers.get("accept"), MEDIA_TYPES[body.format], body.num_images)
    sessions = request.app.state.read_sessionmaker
    plan = await run_in_threadpool(_validate, body, settings, sessions, token)
    seed = secrets.randbits(31) if body.seed is None else body.seed
    seeds = [seed + i for i in range(body.num_images)]

    def encode(images: list[Any]) -> list[bytes]:
        from inference.images import encode_image

        return [encode_image(img, body.format) for img in images]

    from inference.checkpoint import CheckpointError
    from inference.serving import ServingError

    limiter = rt.limiter
    try:
        async with limiter.place(token.id, plan.work):
            try:
                images = await rt.batcher.submit(plan.key(), [Row(body.prompt, s) for s in seeds], limiter.timeout)
            except QueueTimeout:
                raise limiter.busy(f"no generation slot within {limiter.timeout:g} s") from None
    except generate_deadline.GenerationTimeout as err:  # the call was stopped; its slot is already free
        raise APIError("generation_timeout", f"{err} (FLASHDMD_GENERATE_CALL_TIMEOUT_SECONDS); ask for less work",
                       headers={"Retry-After": str(settings.generate_retry_after_seconds)}) from None
    except CheckpointError as err:  # e.g. the teacher the checkpoint names cannot be loaded
        raise _invalid(f"{err.field}: {err}", err.field) from None
    except ServingError as err:
        # The checkpoint's own serving.json is the request's input (422); an operator's FLASHDMD_GENERATE_*
        # combination that cannot work is the server's state (503), never a 500 with a traceback.
        if err.setting == "serving.json":
            raise _invalid(f"checkpoint: {err}", "checkpoint") from None
        raise APIError("not_ready", f"generation is misconfigured on this server ({err})",
                       headers={"Retry-After": str(settings.generate_retry_after_seconds)}) from None
    encoded = await _hold(lambda: encode(images))
    name = plan.checkpoint.id
    if not as_json:
        return Response(encoded[0], media_type=MEDIA_TYPES[body.format],
                        headers={"X-Seed": str(seed), "X-Checkpoint": name, "X-Steps": str(plan.steps)})
    b64 = await run_in_threadpool(lambda: [base64.b64encode(e).decode("ascii") for e in encoded])
    return GenerateResponse(checkpoint=name, steps=plan.steps, width=plan.width, height=plan.height,
                            format=body.format,
                            images=[GeneratedImage(seed=s, media_type=MEDIA_TYPES[body.format], data=d)
                                    for s, d in zip(seeds, b64, strict=True)])
