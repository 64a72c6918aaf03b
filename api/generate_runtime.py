"""The per-app state behind POST /generate: the limiter, the batcher and the pipeline cache.

The cache is built in a worker thread on the first request, as it imports torch; so the API starts (and serves
/jobs) without loading it. The operator's serving options are built here from typed settings
(`Settings.generate_*`) and passed down to inference/, which reads no environment.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from api import generate_deadline
from api.batcher import Batcher
from api.generate_limits import Limiter
from api.generate_plan import BatchKey, Row
from api.observability import GenerateMetrics
from api.settings import Settings

if TYPE_CHECKING:
    from inference.checkpoint import CheckpointInfo
    from inference.pipeline import FewStepPipeline
    from inference.serving import ServingOptions

log = logging.getLogger(__name__)


def serving_options(settings: Settings, device: str) -> ServingOptions:
    """The operator's serving options; unset fields fall back to the checkpoint's serving.json and then the
    device's defaults when a pipeline loads. Raises ServingError (naming the FLASHDMD_GENERATE_* setting) for an
    impossible combination."""
    from inference.serving import ServingOptions

    shapes = settings.warm_shapes()
    sizes = tuple(dict.fromkeys((s.width, s.height) for s in shapes if s.width is not None and s.height is not None))
    batches = tuple(dict.fromkeys(s.batch for s in shapes if s.batch is not None))
    s = settings
    options = ServingOptions(
        dtype=s.generate_dtype, vae_dtype=s.generate_vae_dtype, compile=s.generate_compile,
        compile_mode=s.generate_compile_mode,
        compile_cache_dir=(s.generate_compile_cache_dir or s.data_dir / "compile-cache").expanduser(),
        fuse_qkv=s.generate_fuse_qkv, channels_last=s.generate_channels_last, vae=s.generate_vae,
        tiny_vae_path=None if s.generate_tiny_vae_path is None else s.generate_tiny_vae_path.expanduser(),
        warm_sizes=sizes or None, warm_batches=batches or None)
    options.check(device.startswith("cuda"))
    return options


class Runtime:
    def __init__(self, settings: Settings, metrics: GenerateMetrics | None = None) -> None:
        self.settings = s = settings
        self.limiter = Limiter(s.generate_max_concurrency, s.generate_max_queue, s.generate_queue_timeout_seconds,
                               s.generate_retry_after_seconds, owner_share=s.generate_owner_share,
                               per_minute=s.generate_rate_per_minute, burst=s.generate_rate_burst,
                               work_capacity=s.generate_max_work * s.generate_max_concurrency)
        if s.generate_max_concurrency + s.generate_max_queue < s.generate_max_concurrency * s.generate_max_batch:
            log.warning("FLASHDMD_GENERATE_MAX_QUEUE=%d admits fewer requests than one full batch (%d) per slot: "
                        "the batcher can never fill a batch", s.generate_max_queue, s.generate_max_batch)
        self._cache: Any = None
        self._lock = threading.Lock()
        self.batcher: Batcher[Row, Any] = Batcher(self._sample, max_batch=s.generate_max_batch,
                                                  max_wait=s.generate_max_wait_ms / 1000.0,
                                                  workers=s.generate_max_concurrency, metrics=metrics)
        if metrics is not None:
            metrics.cache.stats = self._cache_stats

    def _cache_stats(self) -> tuple[int, int]:
        cache = self._cache
        return (0, 0) if cache is None else (cache.stats.hits, cache.stats.loads)

    def _sample(self, key: BatchKey, rows: list[Row]) -> list[Any]:
        """One sampler call (in a worker thread): uint8 images [H, W, 3], one per row, in order."""
        pipe = self.pipeline(key.checkpoint)
        fixed = self.settings.generate_fixed_batch
        if fixed is None:
            fixed = pipe.device.type == "cpu"  # see FewStepPipeline.generate_rows
        generate_deadline.install(pipe)
        # The wall-clock limit starts with the call (loading is bounded by the cache, not by this).
        with generate_deadline.deadline(self.settings.generate_call_timeout_seconds):
            images = pipe.generate_rows([r.prompt for r in rows], [r.seed for r in rows], timesteps=key.timesteps,
                                        width=key.width, height=key.height, guidance=key.guidance,
                                        negative_prompt=key.negative_prompt,
                                        pad_to=self.fixed_rows() if fixed else None)
        return list(images)

    def fixed_rows(self) -> int:
        rows, most = self.settings.generate_fixed_rows, self.settings.generate_max_batch
        return most if rows is None else min(rows, most)

    def serving_options(self, device: str) -> ServingOptions:
        return serving_options(self.settings, device)

    def pipeline(self, info: CheckpointInfo) -> FewStepPipeline:
        """The cached pipeline of a checkpoint whose info is already read (a cold load reads no meta.json)."""
        return self.cache().get(str(info.path), source=info)

    def cache(self) -> Any:
        """The pipeline LRU (inference.cache.PipelineCache), keyed by checkpoint folder."""
        with self._lock:
            if self._cache is None:
                self._cache = self._build_cache()
            return self._cache

    def _build_cache(self) -> Any:
        import torch

        from inference.cache import PipelineCache
        from inference.checkpoint import CheckpointInfo
        from inference.pipeline import estimate_bytes, load_pipeline
        from inference.serving import ServingOptions, cache_budget_bytes, torch_dtype

        s = self.settings
        device = s.generate_device or ("cuda" if torch.cuda.is_available() else "cpu")
        options = self.serving_options(device)
        fixed = s.generate_fixed_batch if s.generate_fixed_batch is not None else device == "cpu"
        # Every call has max_batch rows with a fixed batch; else lone requests and full batches matter.
        defaults = ServingOptions(warm_batches=(self.fixed_rows(),) if fixed else (1, s.generate_max_batch))
        dtype = torch_dtype(options.dtype or ("bf16" if device.startswith("cuda") else "fp32"))

        def info_of(source: object) -> CheckpointInfo:
            return source if isinstance(source, CheckpointInfo) else CheckpointInfo.load(Path(str(source)))

        def load(source: object) -> FewStepPipeline:
            pipe = load_pipeline(info_of(source), device=device, options=options, service_defaults=defaults)
            cache_dir = pipe.options.compile_cache_dir
            if pipe.options.compile and cache_dir is not None:
                # Inductor reads its on-disk cache folder only from this variable, for the whole process, so the
                # serving process sets it (before the first compile) rather than the library: every compiled
                # pipeline of this process shares the one folder, which outlives restarts on a volume.
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).absolute())
            return pipe

        return PipelineCache(cache_budget_bytes(device, s.generate_cache_bytes, s.generate_gpu_memory_fraction),
                             load, lambda pipe: pipe.nbytes,
                             estimate=lambda source: estimate_bytes(info_of(source), dtype))


def runtime(app: FastAPI) -> Runtime:
    # Created in the event loop with no await in between, so two first requests cannot both create one.
    rt = getattr(app.state, "generate_runtime", None)
    if rt is None:
        obs = getattr(app.state, "observability", None)
        rt = app.state.generate_runtime = Runtime(app.state.settings, obs.generate if obs else None)
    return rt
