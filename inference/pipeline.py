"""A job checkpoint as a ready few-step pipeline: text encoders, generator, VAE and the K-step sampler.

The teacher pipeline class (`StableDiffusionXLPipeline`, ...) loads the teacher's text
encoders, tokenizers and VAE through diffusers' own `from_pretrained`; the generator
replaces the teacher's denoiser (full UNet/transformer) or is the teacher's denoiser
with the LoRA fused into its weights, so a LoRA generator costs nothing per step.
Sampling goes through `trainer.sampling.sample` (re-exported as `inference.sampler.sample`), the same function as the trainer's
sample grids, and nothing in a `FewStepPipeline` changes after loading, so one instance
serves concurrent requests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from inference.checkpoint import CheckpointError, CheckpointInfo, teacher_ref
from inference.lora import read_lora
from inference.serving import ServingOptions, apply_options, dtype_name, load_tiny_vae, torch_dtype
from trainer.models import Cond, Teacher, pipeline_class
from trainer.sampling import sample, to_uint8

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

DEFAULT_MAX_SIDE = 4096
# Encoded prompts kept per pipeline. Serving sees the same prompts again and again (the demo's ten digits,
# a UI's examples); one SDXL entry is ~0.3 MB in bf16, so 64 bound the cache to ~20 MB.
PROMPT_CACHE = 64


def module_bytes(*modules: nn.Module | None) -> int:
    """Bytes held by parameters and buffers (what the cache's memory budget counts)."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        if m is None:
            continue
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class FewStepPipeline:
    """Immutable after construction (but for its prompt cache, which has a lock); `generate` may be called
    from several threads at once."""

    def __init__(self, info: CheckpointInfo, teacher: Teacher, dtype: torch.dtype,
                 options: ServingOptions | None = None, compiled: nn.Module | None = None) -> None:
        self.info, self.teacher, self.dtype = info, teacher, dtype
        self.net: nn.Module = teacher.denoiser
        self.param = teacher.param
        self.geometry = info.geometry()
        # Without options (the CLI, the trainer's eval), nothing but the dtypes was applied: say so.
        self.options = options or ServingOptions(
            dtype=dtype_name(dtype), vae_dtype=dtype_name(teacher.vae.dtype), fuse_qkv=False,
            channels_last=False).resolved(teacher.device)
        self.compiled = compiled  # the denoiser compiled for the warm shapes (None: compile off)
        self._warm = set(self.options.warm_shapes(info.resolution))
        self._prompts: OrderedDict[tuple[str, int, int], Cond] = OrderedDict()
        self._prompts_lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self.teacher.device

    @property
    def nbytes(self) -> int:
        return module_bytes(self.net, self.teacher.vae, *self.teacher.text_encoders())

    def size(self, width: int | None, height: int | None) -> tuple[int, int]:
        return self.info.check_size(width, height, DEFAULT_MAX_SIDE)

    @torch.no_grad()
    def encode(self, prompts: list[str], width: int, height: int) -> Cond:
        cond = self.teacher.encode(prompts)
        if cond.time_ids is not None:
            # SDXL micro-conditioning for the requested size, as diffusers' pipeline builds it:
            # (original h, w) + (crop top, left) + (target h, w).
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.embeds.dtype, device=self.device)
            cond = Cond(cond.embeds, cond.pooled, ids.expand(len(prompts), 6))
        return cond

    def encode_one(self, prompt: str, width: int, height: int) -> Cond:
        """`encode([prompt], ...)` through a small LRU: a repeated prompt costs no text-encoder call."""
        key = (prompt, width, height)
        with self._prompts_lock:
            hit = self._prompts.get(key)
            if hit is not None:
                self._prompts.move_to_end(key)
                return hit
        cond = self.encode([prompt], width, height)  # outside the lock: other threads' hits go on
        with self._prompts_lock:
            self._prompts[key] = cond
            while len(self._prompts) > PROMPT_CACHE:
                self._prompts.popitem(last=False)
        return cond

    def denoiser(self, rows: int, width: int, height: int) -> nn.Module:
        """The compiled denoiser for a warmed (rows, width, height), else the eager one."""
        if self.compiled is not None and (rows, width, height) in self._warm:
            return self.compiled
        return self.net

    def add_warm(self, shapes: Sequence[tuple[int, int, int]]) -> None:
        """Declare more (rows, width, height) shapes warm (serving.warm_up, before the first request)."""
        self._warm = self._warm | set(shapes)

    def bucket(self, rows: int, width: int, height: int) -> int | None:
        """With compile on, the smallest warmed batch at this size that holds `rows` (pad up to it)."""
        if self.compiled is None:
            return None
        fits = [b for b, w, h in self._warm if w == width and h == height and b >= rows]
        return min(fits) if fits else None

    def uncond(self, n: int, negative_prompt: str | None, width: int, height: int) -> Cond:
        if negative_prompt:
            return self.encode_one(negative_prompt, width, height).map(lambda v: v.expand(n, *v.shape[1:]))
        base = self.teacher.uncond(n)  # SDXL: zeros (force_zeros_for_empty_prompt); others: ""
        if base.time_ids is not None:
            base = Cond(base.embeds, base.pooled, self.encode_one("", width, height).time_ids.expand(n, 6))
        return base

    def latents(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int | None = None,
                width: int | None = None, height: int | None = None, guidance: float = 1.0,
                negative_prompt: str | None = None, cond: Cond | None = None) -> Tensor:
        """Final x0 latents [B, C, h, w]; one seed per image. `cond` skips text encoding (benchmarks)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        ts = self.info.timesteps_for(steps)
        w, h = self.size(width, height)
        cond = cond if cond is not None else self.encode(list(prompts), w, h)
        uncond = self.uncond(len(prompts), negative_prompt, w, h) if guidance != 1.0 else None
        f = self.geometry.vae_scale
        shape = (self.geometry.latent_channels, h // f, w // f)
        return sample(self.net, cond, ts, self.param, seeds=seeds, latent_shape=shape, guidance=guidance,
                      uncond=uncond, dtype=self.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1], [B, 3, H, W]."""
        return self.teacher.decode(latents)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], **kw: object) -> np.ndarray:
        """uint8 images [B, H, W, 3]."""
        return to_uint8(self.decode(self.latents(prompts, seeds, **kw))).numpy()  # type: ignore[arg-type]

    @torch.no_grad()
    def generate_rows(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int | None = None, width: int,
                      height: int, guidance: float = 1.0, negative_prompt: str | None = None,
                      pad_to: int | None = None, timesteps: Sequence[int] | None = None) -> np.ndarray:
        """uint8 images [B, H, W, 3] whose bytes do not depend on which other rows share the call.

        The serving batcher merges requests, so a row must come out the same whoever its neighbours are.
        On the CPU, kernels pick their algorithm by shape (MKL's GEMV for one row, GEMM for several; oneDNN
        convolutions by batch size), so a row sampled in a batch of 8 differs from the same row alone in the
        last float bits, and after rounding to uint8 now and then by one level. At a *fixed* shape the
        kernels treat every row alike, whatever its position or its neighbours. So: each distinct prompt is
        encoded alone, the generator always sees `pad_to` rows (the last row repeated; its copies are
        dropped; more rows go in several calls of `pad_to`), and the VAE decodes one image per call. With
        compile on and no `pad_to`, rows are padded up to the nearest warmed batch, so the compiled graphs
        cover every call at a warmed size. `timesteps`, when the caller has resolved them already (the
        service's GenerationPlan), replace `steps`.
        """
        n = len(prompts)
        if n != len(seeds) or n == 0 or (pad_to is not None and pad_to < 1):
            raise ValueError(f"{n} prompts, {len(seeds)} seeds, pad_to={pad_to}")
        ts = list(timesteps) if timesteps is not None else self.info.timesteps_for(steps)
        if pad_to is not None and n > pad_to:  # calls of pad_to rows each: every row still sees one shape
            return np.concatenate([self.generate_rows(prompts[i:i + pad_to], seeds[i:i + pad_to], width=width,
                                                      height=height, guidance=guidance,
                                                      negative_prompt=negative_prompt, pad_to=pad_to, timesteps=ts)
                                   for i in range(0, n, pad_to)])
        total = pad_to or (self.bucket(n, width, height) if guidance == 1.0 else None) or n
        rows = list(prompts) + [prompts[-1]] * (total - n)
        row_seeds = list(seeds) + [seeds[-1]] * (total - n)
        cond = Cond.cat([self.encode_one(p, width, height) for p in rows])
        uncond = self.uncond(len(rows), negative_prompt, width, height) if guidance != 1.0 else None
        f = self.geometry.vae_scale
        # CFG doubles the rows the denoiser sees: a shape no warm-up compiled, so it runs eager.
        net = self.denoiser(total, width, height) if uncond is None else self.net
        latents = sample(net, cond, ts, self.param, seeds=row_seeds,
                         guidance=guidance, uncond=uncond,
                         latent_shape=(self.geometry.latent_channels, height // f, width // f), dtype=self.dtype)
        return np.concatenate([to_uint8(self.decode(latents[i:i + 1])).numpy() for i in range(n)])


def estimate_bytes(info: CheckpointInfo, dtype: torch.dtype = torch.float32) -> int:
    """A pre-load guess of `FewStepPipeline.nbytes` from the weight files on disk (0 when not local)."""
    ref = Path(teacher_ref(info.teacher))
    if not ref.is_dir():
        return 0
    scale = torch.empty(0, dtype=dtype).element_size() / 4  # files are float32; VAE stays float32
    total = 0.0
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", info.denoiser_name):
        folder = info.path / info.generator if sub == info.denoiser_name and info.generator != "lora" else ref / sub
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        total += size * (1.0 if sub == "vae" else scale)
    return int(total)


def _load_denoiser(info: CheckpointInfo) -> nn.Module:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    cls = SD3Transformer2DModel if info.generator == "transformer" else UNet2DConditionModel
    return cls.from_pretrained(info.path / info.generator)


def _fuse_lora(pipe: DiffusionPipeline, info: CheckpointInfo) -> None:
    """Load the checkpoint's LoRA with its real alpha, merge it into the weights and drop the adapter."""
    state, metadata = read_lora(info)
    cls = type(pipe)
    if info.family == "sd3":
        cls.load_lora_into_transformer(state, pipe.transformer, adapter_name="flashdmd", _pipeline=pipe,
                                       metadata=metadata)
    else:
        cls.load_lora_into_unet(state, None, pipe.unet, adapter_name="flashdmd", _pipeline=pipe, metadata=metadata)
    pipe.fuse_lora(components=[info.denoiser_name], lora_scale=1.0, adapter_names=["flashdmd"])
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go


def load_pipeline(checkpoint: str | Path | CheckpointInfo, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32,
                  options: ServingOptions | None = None,
                  service_defaults: ServingOptions | None = None) -> FewStepPipeline:
    """Build the few-step pipeline of a checkpoint (folder or run directory).

    dtype applies to the generator and text encoders. The VAE has its own: SDXL's VAE overflows in fp16,
    bf16 is fine and faster on GPUs, float32 is the safe default.
    With `options` (the service), they replace dtype/vae_dtype: unset fields come from the checkpoint's
    serving.json, then from `service_defaults`, then from the defaults for `device` (inference/serving.py);
    the weights go to the device
    once, already in their serving dtype, and the VAE choice, fused QKV, channels-last and compile are applied.
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else CheckpointInfo.load(checkpoint)
    opts = None
    if options is not None:
        opts = options.merged(ServingOptions.read(info.path)).merged(service_defaults or ServingOptions())
        opts = opts.resolved(device)
    ref = teacher_ref(info.teacher)
    kwargs: dict[str, object] = {"revision": info.revision} if info.revision else {}
    if info.family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if info.generator != "lora":
        kwargs[info.denoiser_name] = _load_denoiser(info)  # the teacher's own denoiser is never loaded
    try:
        pipe = pipeline_class(info.family).from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load teacher {info.teacher!r} of {info.path}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    if info.generator == "lora":
        _fuse_lora(pipe, info)
    teacher = Teacher(pipe, info.family, info.teacher, info.resolution, info.shift)
    if opts is None:
        for m in (teacher.denoiser, *teacher.text_encoders()):
            if m.dtype != dtype:  # diffusers warns on every cast, even a no-op one
                m.to(dtype)
        if teacher.vae.dtype != vae_dtype:
            teacher.vae.to(vae_dtype)
        teacher.to(device)
        return FewStepPipeline(info, teacher, dtype)
    return serve(info, teacher, opts, device)


def serve(info: CheckpointInfo, teacher: Teacher, opts: ServingOptions, device: str | torch.device) -> FewStepPipeline:
    """Apply resolved serving options to a loaded teacher (weights anywhere) and wrap it for serving.

    The order matters: the full VAE is swapped for the tiny one before anything moves, weights take their
    serving dtype before they move to the device (one copy there), and QKV fusion, channels-last and
    compile act on the modules in place, on the device. bench/gpu_serve.py calls this on a pipeline built
    in memory; `load_pipeline(..., options=)` on one read from disk.
    """
    dtype, vae_dtype = torch_dtype(opts.dtype), torch_dtype(opts.vae_dtype)  # type: ignore[arg-type]
    if opts.vae == "tiny":
        assert opts.tiny_vae_path is not None  # resolved() checked it
        tiny = load_tiny_vae(opts.tiny_vae_path, latent_channels=teacher.latent_channels,
                             vae_scale=teacher.vae_scale, dtype=vae_dtype)
        teacher.vae = teacher.pipe.vae = tiny  # the full VAE is dropped before anything moves to the device
    for m in (teacher.denoiser, *teacher.text_encoders()):
        if m.dtype != dtype:  # diffusers warns on every cast, even a no-op one
            m.to(dtype)
    if teacher.vae.dtype != vae_dtype:
        teacher.vae.to(vae_dtype)
    teacher.to(device)
    compiled = apply_options(teacher.denoiser, teacher.vae, opts)
    return FewStepPipeline(info, teacher, dtype, opts, compiled)
