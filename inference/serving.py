"""How a checkpoint is served: dtype, compile, fused QKV, channels-last, VAE choice, warm shapes.

`ServingOptions` is one typed object; every field is a service setting (`FLASHDMD_GENERATE_<FIELD>`,
api/settings.py) and `None` means "not set here". Precedence, highest first: what the operator set, the
`serving.json` the checkpoint (or exported folder) carries (the options it was validated with, written by
`flashdmd export`), then the built-in default for the device (`resolved`). Machine-specific fields (the
compile cache folder, the tiny VAE folder) never travel in serving.json.

    load_pipeline(ckpt, device=..., options=ServingOptions(...))   applies them (inference/pipeline.py)
    warm_up(pipeline, options) -> dict                              samples every warm shape once, compiling
                                                                    the UNet for it when compile is on
    cache_budget_bytes(device, cpu_bytes, gpu_fraction)             the pipeline LRU's budget

Impossible combinations raise `ServingError`, whose `setting` names the environment variable to fix.
The options arrive typed (the service builds them from its settings, the CLI from its flags): this module
reads no environment. `warm_up` takes anything shaped like a `FewStepPipeline` (`Warmable`), so this module
and inference/pipeline.py, which applies the options, do not import each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from inference.checkpoint import CheckpointInfo

SERVING_FILE = "serving.json"
DTYPE_NAMES = ("fp32", "fp16", "bf16")
VAE_KINDS = ("full", "tiny")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ARTIFACTS_FILE = "torch-compile-artifacts.bin"
# Never written to serving.json: they name folders on the machine that validated the checkpoint.
LOCAL_FIELDS = ("compile_cache_dir", "tiny_vae_path")


class ServingError(ValueError):
    """A serving option (or combination) that cannot work. `setting` is the environment variable to fix."""

    def __init__(self, message: str, setting: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class Warmable(Protocol):
    """What `warm_up` needs of a pipeline (inference.pipeline.FewStepPipeline)."""

    info: CheckpointInfo
    options: ServingOptions

    @property
    def device(self) -> torch.device: ...

    def size(self, width: int | None, height: int | None) -> tuple[int, int]: ...

    def add_warm(self, shapes: Sequence[tuple[int, int, int]]) -> None: ...

    def generate_rows(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int | None = None, width: int,
                      height: int, pad_to: int | None = None) -> np.ndarray: ...


def setting_name(field: str) -> str:
    return f"FLASHDMD_GENERATE_{field.upper()}"


@dataclass(frozen=True)
class ServingOptions:
    dtype: str | None = None  # generator + text encoders; default bf16 on cuda, fp32 on cpu
    vae_dtype: str | None = None  # default bf16 on cuda (SDXL's VAE overflows in fp16), fp32 on cpu
    compile: bool | None = None  # torch.compile the denoiser for the warm shapes; default off
    compile_mode: str | None = None  # torch.compile mode; default "default"
    compile_cache_dir: Path | None = None  # inductor's on-disk cache, kept across restarts
    fuse_qkv: bool | None = None  # fused attention projections; default on cuda
    channels_last: bool | None = None  # UNet and VAE in channels-last; default on cuda
    vae: str | None = None  # "full" | "tiny" (diffusers AutoencoderTiny from tiny_vae_path); default full
    tiny_vae_path: Path | None = None
    warm_sizes: tuple[tuple[int, int], ...] | None = None  # (width, height); default the training resolution
    warm_batches: tuple[int, ...] | None = None  # rows per sampler call; default (1,)

    def merged(self, defaults: ServingOptions) -> ServingOptions:
        """These options, with every unset field taken from `defaults`."""
        return replace(self, **{f.name: getattr(defaults, f.name) for f in fields(self)
                                if getattr(self, f.name) is None})

    def resolved(self, device: str | torch.device) -> ServingOptions:
        """Every field set: the built-in defaults for `device`, then a validity check."""
        cuda = str(device).startswith("cuda")
        out = self.merged(ServingOptions(
            dtype="bf16" if cuda else "fp32", vae_dtype="bf16" if cuda else "fp32", compile=False,
            compile_mode="default", fuse_qkv=cuda, channels_last=cuda, vae="full", warm_sizes=(), warm_batches=(1,)))
        out.check(cuda)
        return out

    def check(self, cuda: bool) -> None:
        for name in ("dtype", "vae_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPE_NAMES:
                raise ServingError(f"{value!r} is not one of {', '.join(DTYPE_NAMES)}", setting_name(name))
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ServingError(f"{self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}",
                               setting_name("compile_mode"))
        if self.compile and self.compile_mode == "reduce-overhead" and not cuda:
            raise ServingError("reduce-overhead records CUDA graphs and needs a cuda device",
                               setting_name("compile_mode"))
        if self.vae is not None and self.vae not in VAE_KINDS:
            raise ServingError(f"{self.vae!r} is not one of {', '.join(VAE_KINDS)}", setting_name("vae"))
        if self.vae == "tiny":
            path = self.tiny_vae_path
            if path is None:
                raise ServingError("FLASHDMD_GENERATE_VAE=tiny needs a local AutoencoderTiny folder",
                                   setting_name("tiny_vae_path"))
            if not (Path(path) / "config.json").is_file():
                raise ServingError(f"{path} is not an AutoencoderTiny folder (no config.json)",
                                   setting_name("tiny_vae_path"))
        if any(b < 1 for b in self.warm_batches or ()):
            raise ServingError("batch sizes must be at least 1", setting_name("warm_batches"))
        if any(w < 1 or h < 1 for w, h in self.warm_sizes or ()):
            raise ServingError("sizes must be positive", setting_name("warm_sizes"))

    # -- serving.json: what `flashdmd export` writes next to the weights --
    def portable(self) -> dict[str, Any]:
        """The set fields that mean the same on another machine (JSON-ready)."""
        out = {k: v for k, v in asdict(self).items() if v is not None and k not in LOCAL_FIELDS}
        for key in ("warm_sizes", "warm_batches"):
            if key in out:
                out[key] = [list(s) if isinstance(s, tuple) else s for s in out[key]]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = SERVING_FILE) -> ServingOptions:
        known = {f.name for f in fields(cls)} - set(LOCAL_FIELDS)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ServingError(f"{source} has unknown keys {unknown}", "serving.json")
        kw = dict(data)
        if "warm_sizes" in kw:
            kw["warm_sizes"] = tuple((int(w), int(h)) for w, h in kw["warm_sizes"])
        if "warm_batches" in kw:
            kw["warm_batches"] = tuple(int(b) for b in kw["warm_batches"])
        out = cls(**kw)
        try:
            out.check(cuda=True)  # device-independent checks only; the device is known when it is resolved
        except ServingError as err:  # the checkpoint's file is at fault, not the operator's setting
            raise ServingError(f"{source}: {err}", "serving.json") from None
        return out

    @classmethod
    def read(cls, folder: str | Path) -> ServingOptions:
        """The options in `folder/serving.json`, or none set when it has none."""
        path = Path(folder) / SERVING_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ServingError(f"{path} is unreadable: {err}", "serving.json") from None
        return cls.from_json(data, str(path))

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / SERVING_FILE
        path.write_text(json.dumps(self.portable(), indent=2, sort_keys=True))
        return path

    def warm_shapes(self, resolution: int) -> list[tuple[int, int, int]]:
        """(batch, width, height) for every warm batch at every warm size (default size: `resolution`²)."""
        sizes = self.warm_sizes or ((resolution, resolution),)
        return [(b, w, h) for w, h in sizes for b in sorted(set(self.warm_batches or (1,)))]


def cache_budget_bytes(device: str | torch.device, cpu_bytes: int, gpu_fraction: float,
                       total_bytes: int | None = None) -> int:
    """The pipeline LRU's budget: `gpu_fraction` of the GPU's total memory on cuda, `cpu_bytes` elsewhere.

    A fraction of the card, not a byte count, so one setting fits an H100 and an H200; what it leaves free is
    for activations, the compile workspace and the allocator's slack. `total_bytes` stands in for
    `torch.cuda.mem_get_info` (tests, or a caller that already knows it).
    """
    if not str(device).startswith("cuda"):
        return int(cpu_bytes)
    if not 0 < gpu_fraction <= 1:
        raise ServingError(f"{gpu_fraction} is not in (0, 1]", setting_name("gpu_memory_fraction"))
    if total_bytes is None:
        import torch

        total_bytes = int(torch.cuda.mem_get_info(torch.device(device))[1])
    return max(1, int(total_bytes * gpu_fraction))


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    import torch

    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def load_tiny_vae(path: Path, *, latent_channels: int, vae_scale: int, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' AutoencoderTiny from a local folder, checked against the checkpoint's latent space."""
    from diffusers import AutoencoderTiny

    setting = setting_name("tiny_vae_path")
    try:
        vae = AutoencoderTiny.from_pretrained(path, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise ServingError(f"cannot load an AutoencoderTiny from {path}: {err}", setting) from None
    scale = int(vae.config.upsampling_scaling_factor) ** (len(vae.config.decoder_block_out_channels) - 1)
    if int(vae.config.latent_channels) != latent_channels or scale != vae_scale:
        raise ServingError(f"{path} decodes {vae.config.latent_channels}-channel latents {scale}x up; this checkpoint "
                           f"has {latent_channels} channels and a VAE factor of {vae_scale}", setting)
    return vae.requires_grad_(False).eval()


def apply_options(net: torch.nn.Module, vae: torch.nn.Module, opts: ServingOptions) -> torch.nn.Module | None:
    """Fuse QKV, channels-last and compile, in place on modules already on their device and in their dtype.

    Returns the compiled denoiser (or None): the eager module stays usable for shapes that were not warmed,
    so an unexpected size costs an eager forward, not a compile in the middle of a request.
    """
    import torch

    if opts.fuse_qkv:
        for module, name in ((net, "denoiser"), (vae, "vae")):
            fuse = getattr(module, "fuse_qkv_projections", None)
            if fuse is None:
                if module is net:
                    raise ServingError(f"the {type(net).__name__} {name} has no fused QKV projections",
                                       setting_name("fuse_qkv"))
                continue  # AutoencoderTiny has no attention to fuse
            try:
                fuse()
            except ValueError as err:  # e.g. added KV projections
                raise ServingError(f"cannot fuse the {name}'s projections: {err}", setting_name("fuse_qkv")) from None
    if opts.channels_last:
        net.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if not opts.compile:
        return None
    # dynamic=False: one static graph per warm shape (the fastest kernels); other shapes run eager.
    return torch.compile(net, mode=None if opts.compile_mode == "default" else opts.compile_mode, dynamic=False)


def use_compile_cache(folder: Path) -> Path | None:
    """Load the compile artifacts saved in `folder` (created) into inductor's caches, if there are any.

    The artifacts file is torch's portable "mega-cache" of a previous warm-up: copied with the folder to a fresh
    machine or image, it fills the local caches, so a restart skips inductor's code generation and kernel
    builds. Where inductor keeps its own on-disk cache is process-wide (TORCHINDUCTOR_CACHE_DIR): the process
    entry decides that (the service points it at this same folder, api/generate_runtime.py), not this library.
    Returns the artifacts file that was loaded, if any.
    """
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    artifacts = folder / ARTIFACTS_FILE
    if artifacts.is_file():
        torch.compiler.load_cache_artifacts(artifacts.read_bytes())
        return artifacts
    return None


def save_compile_cache(folder: Path) -> Path | None:
    """Write this process's compile artifacts to `folder` (what `use_compile_cache` loads next time)."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        return None
    path = folder / ARTIFACTS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(saved[0])
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return path


def warm_up(pipeline: Warmable, options: ServingOptions | None = None) -> dict[str, Any]:
    """Sample every warm shape once, so the first real request pays no compile, allocation or kernel selection.

    With compile on, this is when the denoiser is compiled, once per (batch, size); from the on-disk cache
    (`compile_cache_dir`) a restart reuses the kernels. Returns timings: {"shapes": [{batch, width, height,
    seconds}], "total_s", "compile", "cache_loaded"}. Call it before reporting ready.
    """
    opts = pipeline.options if options is None else options.merged(pipeline.options)
    shapes_wanted = [(b, *pipeline.size(w, h)) for b, w, h in opts.warm_shapes(pipeline.info.resolution)]
    pipeline.add_warm(shapes_wanted)  # before serving: from now on these shapes take the compiled graph
    loaded = None
    if opts.compile:
        import torch

        # Graphs are cached per code object across pipelines (every cached checkpoint of one architecture
        # shares UNet2DConditionModel.forward): room for all their warm shapes, not dynamo's default 8.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if opts.compile_cache_dir is not None:
            loaded = use_compile_cache(Path(opts.compile_cache_dir))
    shapes = []
    start = time.perf_counter()
    steps = pipeline.info.num_steps
    for batch, w, h in shapes_wanted:
        t0 = time.perf_counter()
        pipeline.generate_rows(["warm-up"] * batch, list(range(batch)), steps=steps, width=w, height=h,
                               pad_to=batch)
        _sync(pipeline)
        shapes.append({"batch": batch, "width": w, "height": h, "seconds": time.perf_counter() - t0})
    total = time.perf_counter() - start
    if opts.compile and opts.compile_cache_dir is not None and loaded is None:
        save_compile_cache(Path(opts.compile_cache_dir))
    return {"shapes": shapes, "total_s": total, "compile": bool(opts.compile),
            "cache_loaded": None if loaded is None else str(loaded), "cache_counters": _cache_counters()}


def _cache_counters() -> dict[str, int]:
    """Inductor's FX-graph and AOTAutograd cache hits and misses so far in this process (0s without compile):
    a warm restart should show hits and no misses."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return {}
    from torch._dynamo.utils import counters

    return {k: int(v) for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items()
            if "cache_hit" in k or "cache_miss" in k}


def _sync(pipeline: Warmable) -> None:
    if pipeline.device.type == "cuda":
        import torch

        torch.cuda.synchronize(pipeline.device)
