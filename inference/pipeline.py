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

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from inference.checkpoint import CheckpointError, CheckpointInfo, teacher_ref
from inference.lora import read_lora
from trainer.models import Cond, Teacher, pipeline_class
from trainer.sampling import sample, to_uint8

DEFAULT_MAX_SIDE = 4096


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
    """Immutable after construction; `generate` may be called from several threads at once."""

    def __init__(self, info: CheckpointInfo, teacher: Teacher, dtype: torch.dtype) -> None:
        self.info, self.teacher, self.dtype = info, teacher, dtype
        self.net: nn.Module = teacher.denoiser
        self.param = teacher.param
        self.geometry = info.geometry()

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

    def uncond(self, n: int, negative_prompt: str | None, width: int, height: int) -> Cond:
        if negative_prompt:
            return self.encode([negative_prompt] * n, width, height)
        base = self.teacher.uncond(n)  # SDXL: zeros (force_zeros_for_empty_prompt); others: ""
        if base.time_ids is not None:
            base = Cond(base.embeds, base.pooled, self.encode([""], width, height).time_ids.expand(n, 6))
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
    def generate_rows(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int | None, width: int,
                      height: int, guidance: float = 1.0, negative_prompt: str | None = None,
                      pad_to: int | None = None) -> np.ndarray:
        """uint8 images [B, H, W, 3] whose bytes do not depend on which other rows share the call.

        The serving batcher merges requests, so a row must come out the same whoever its neighbours are.
        On the CPU, kernels pick their algorithm by shape (MKL's GEMV for one row, GEMM for several; oneDNN
        convolutions by batch size), so a row sampled in a batch of 8 differs from the same row alone in the
        last float bits, and after rounding to uint8 now and then by one level. At a *fixed* shape the
        kernels treat every row alike, whatever its position or its neighbours. So: each distinct prompt is
        encoded alone, the generator always sees `pad_to` rows (the last row repeated; its copies are
        dropped), and the VAE decodes one image per call.
        """
        n = len(prompts)
        if n != len(seeds) or n == 0 or (pad_to is not None and n > pad_to):
            raise ValueError(f"{n} prompts, {len(seeds)} seeds, pad_to={pad_to}")
        ts = self.info.timesteps_for(steps)
        encoded = {p: self.encode([p], width, height) for p in dict.fromkeys(prompts)}
        rows = list(prompts) + [prompts[-1]] * ((pad_to or n) - n)
        row_seeds = list(seeds) + [seeds[-1]] * ((pad_to or n) - n)
        cond = Cond.cat([encoded[p] for p in rows])
        uncond = self.uncond(len(rows), negative_prompt, width, height) if guidance != 1.0 else None
        f = self.geometry.vae_scale
        latents = sample(self.net, cond, ts, self.param, seeds=row_seeds, guidance=guidance, uncond=uncond,
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


def _fuse_lora(pipe, info: CheckpointInfo) -> None:  # noqa: ANN001
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
                  dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32) -> FewStepPipeline:
    """Build the few-step pipeline of a checkpoint (folder or run directory).

    dtype applies to the generator and text encoders. The VAE has its own: SDXL's VAE overflows in fp16,
    bf16 is fine and faster on GPUs, float32 is the safe default.
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else CheckpointInfo.load(checkpoint)
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
    if dtype != torch.float32:
        for m in (teacher.denoiser, *teacher.text_encoders()):
            m.to(dtype)
    if vae_dtype != torch.float32:
        teacher.vae.to(vae_dtype)
    teacher.to(device)
    return FewStepPipeline(info, teacher, dtype)
