"""Export a checkpoint for use outside flashdmd (nothing is pickled: safetensors and JSON only).

    diffusers   a full pipeline folder (`DiffusionPipeline.from_pretrained`). Its scheduler reproduces our
                sampler: SDXL/SD1.5 get `LCMScheduler` with `original_inference_steps = K`, whose default
                K-step schedule is exactly [999, 749, 499, 249] (K = 4), so `pipe(prompt,
                num_inference_steps=K, guidance_scale=0)` is our sampler; a non-uniform trained list
                must be passed as `timesteps=`. SD3 gets `FlowMatchEulerDiscreteScheduler(
                stochastic_sampling=True)` (x0, then fresh noise at the next sigma, as ours); it needs
                `sigmas=` (written to flashdmd.json), and its re-noising draws from torch's global RNG,
                so seed with `torch.manual_seed(seed)` and pass no generator to match us per image.
    unet        the generator alone (UNet or SD3 transformer, LoRA fused in), diffusers keys, one file.
    lora        LoRA in diffusers/PEFT keys with its adapter config (alpha), for `load_lora_weights`.
    lora-kohya  LoRA in kohya/ComfyUI keys (`lora_unet_...`, see inference/lora.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from inference.checkpoint import LORA_FORMATS, CheckpointError, CheckpointInfo
from inference.lora import METADATA_KEY, read_lora, to_kohya
from inference.serving import ServingOptions

FORMATS = LORA_FORMATS  # every format; a full-weight checkpoint has no LoRA to export
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_output(info: CheckpointInfo, fmt: str) -> Path:
    return Path(f"{info.id.replace('/', '-')}-{fmt}")


def sampler_call(info: CheckpointInfo) -> dict[str, Any]:
    """The diffusers pipeline call arguments that reproduce our K-step sampler with the exported scheduler."""
    ts = list(info.timesteps)
    if info.family == "sd3":
        # Flow.sigma(t) = shift*u/(1+(shift-1)*u), u=(t+1)/T: the scheduler applies the shift to these u.
        return {"sigmas": [(t + 1) / 1000 for t in ts], "guidance_scale": 0.0}
    if ts == lcm_timesteps(len(ts)):
        return {"num_inference_steps": len(ts), "guidance_scale": 0.0}
    return {"timesteps": ts, "guidance_scale": 0.0}


def lcm_timesteps(steps: int) -> list[int]:
    """LCMScheduler's default schedule with original_inference_steps = num_inference_steps = K (T = 1000)."""
    k = 1000 // steps
    return [(i + 1) * k - 1 for i in reversed(range(steps))]


def export_checkpoint(checkpoint: str | Path | CheckpointInfo, fmt: str, out: str | Path | None = None, *,
                      dtype: str = "fp32", serving: ServingOptions | None = None) -> Path:
    """Write `fmt` for a checkpoint into folder `out` (created; default ./<run>-step-N-<fmt>); returns it.

    Next to the weights goes serving.json: the serving options the checkpoint was validated with (`serving`,
    over those the checkpoint itself carries), which the service takes as defaults when it loads the folder.
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else CheckpointInfo.load(checkpoint)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}", "format")
    if fmt not in info.export_formats():
        raise CheckpointError(f"format {fmt!r} needs a LoRA checkpoint; this one has a full {info.generator}",
                              "format")
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}", "dtype")
    out = Path(out) if out is not None else default_output(info, fmt)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output folder {out} exists and is not empty", "output")
    # Write next to the target and rename: a failed export leaves no half-written folder behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        {"diffusers": _diffusers, "unet": _unet, "lora": _lora, "lora-kohya": _kohya}[fmt](info, tmp, DTYPES[dtype])
        (tmp / "flashdmd.json").write_text(json.dumps(_card(info, fmt, dtype), indent=2))
        (serving or ServingOptions()).merged(ServingOptions.read(info.path)).write(tmp)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _card(info: CheckpointInfo, fmt: str, dtype: str) -> dict[str, Any]:
    return {"checkpoint": info.id, "step": info.step, "family": info.family, "teacher": info.teacher,
            "format": fmt, "dtype": dtype, "timesteps": list(info.timesteps), "resolution": info.resolution,
            "pipeline_call": sampler_call(info), "lora": info.lora, "shift": info.shift,
            "step_sets": {str(k): list(v) for k, v in info.step_sets.items()}}


def few_step_scheduler(info: CheckpointInfo, teacher_config: dict[str, Any]):  # noqa: ANN201
    """The diffusers scheduler that steps like our sampler, configured from the teacher's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    if info.family == "sd3":
        shift = info.shift if info.shift is not None else teacher_config.get("shift", 1.0)
        return FlowMatchEulerDiscreteScheduler.from_config(teacher_config, shift=shift, stochastic_sampling=True)
    # timestep_spacing/steps_offset only matter to the teacher's scheduler; LCM builds its own list.
    return LCMScheduler.from_config(teacher_config, original_inference_steps=info.num_steps)


def _pipe(info: CheckpointInfo, dtype: torch.dtype):  # noqa: ANN202
    from inference.pipeline import load_pipeline

    return load_pipeline(info, dtype=dtype)


def _diffusers(info: CheckpointInfo, out: Path, dtype: torch.dtype) -> None:
    fsp = _pipe(info, dtype)
    pipe = fsp.teacher.pipe
    pipe.scheduler = few_step_scheduler(info, dict(pipe.scheduler.config))
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "README.md").write_text(_readme(info))


def _unet(info: CheckpointInfo, out: Path, dtype: torch.dtype) -> None:
    net = _pipe(info, dtype).net
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    meta = {"format": "pt", "config": json.dumps(dict(net.config), default=str), "flashdmd": json.dumps(_card(info, "unet", ""))}
    save_file(state, str(out / f"{info.denoiser_name}.safetensors"), metadata=meta)
    # The architecture next to the weights: `UNet2DConditionModel.from_config(...)` then `load_state_dict`.
    (out / "config.json").write_text(json.dumps(dict(net.config), indent=2, default=str))


def _lora(info: CheckpointInfo, out: Path, dtype: torch.dtype) -> None:
    state, metadata = read_lora(info)
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    # The same file diffusers' save_lora_weights writes, plus the adapter config it needs for alpha.
    save_file(state, str(out / "pytorch_lora_weights.safetensors"),
              metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})


def _kohya(info: CheckpointInfo, out: Path, dtype: torch.dtype) -> None:
    state, metadata = read_lora(info)
    unet_config = None
    if info.denoiser_name == "unet":
        from inference.checkpoint import read_model_config, teacher_ref

        unet_config = read_model_config(teacher_ref(info.teacher), "unet", info.revision)
    kohya = to_kohya(state, metadata, info.denoiser_name, unet_config)
    kohya = {k: (v if k.endswith(".alpha") else v.to(dtype)) for k, v in kohya.items()}
    lora = info.lora or {}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora.get("rank", "")),
            "ss_network_alpha": str(lora.get("alpha", "")), "flashdmd": json.dumps(_card(info, "lora-kohya", ""))}
    save_file(kohya, str(out / f"{info.id.replace('/', '-')}-kohya.safetensors"), metadata=meta)


def _readme(info: CheckpointInfo) -> str:
    call = ", ".join(f"{k}={v!r}" for k, v in sampler_call(info).items())
    seed = ("torch.manual_seed(0)  # the scheduler re-noises from the global RNG\nimage = pipe(prompt, " + call
            + ").images[0]") if info.family == "sd3" else (
        "g = torch.Generator().manual_seed(0)\nimage = pipe(prompt, " + call + ", generator=g).images[0]")
    return (f"# {info.id}: a {info.num_steps}-step flashdmd generator ({info.family})\n\n"
            f"Trained timesteps: {list(info.timesteps)}. No classifier-free guidance.\n\n"
            "```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
            "pipe = DiffusionPipeline.from_pretrained(\"path/to/this/folder\")\n"
            f"{seed}\n```\n")
