"""GPU benchmark: seconds per 1024^2 image from an SDXL-size random-weight few-step pipeline (target <= 0.25 s, H100).

    python bench/gpu_generate.py                      # SDXL sizes, bf16, 1024^2, K = 4, on cuda
    python bench/gpu_generate.py --channels-last --compile
    python bench/gpu_generate.py --model tiny --device cpu --no-write   # a smoke run of this script on a CPU

The `sdxl` model is built in memory with SDXL-base's architecture (UNet 2.6 B parameters, CLIP-L and bigG-sized
text encoders, the 4-block VAE) and random weights; no download is needed. It goes through
`inference.pipeline.FewStepPipeline`, the service's sampler path. Measured (medians, CUDA-synchronised):
  end_to_end   `generate` for one prompt: text encoding, K UNet steps, VAE decode, uint8 copy to the host
  k_step       the sampler + decode given the text conditioning
  lower_bound  K bare UNet forwards + one VAE decode
  teacher      the same weights through diffusers' StableDiffusionXLPipeline, 50 steps, CFG 5
  batch4       `generate` of 4 images, per image
and peak GPU memory. Results go to bench/results/inference.json under "gpu".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import REPO, command_line, machine_info, write_json

RESULTS = REPO / "bench" / "results" / "inference.json"
PROMPT = "a photo of a red fox in the snow, highly detailed"
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512), scaling_factor=0.13025,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build_sdxl(root: Path, device: str) -> tuple[Any, Path]:
    """An SDXL-architecture pipeline with random weights, created on `device`, plus a checkpoint folder
    (meta.json and the model configs, no weights) that describes it to FewStepPipeline."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.tiny import build_clip_tokenizer

    tok = build_clip_tokenizer(root / "tokenizer")

    def clip(width: int, layers: int, heads: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width,
                              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                              projection_dim=width, hidden_act=act, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    with torch.device(device):  # initialise on the GPU: seconds instead of minutes for 3.5 B parameters
        torch.manual_seed(0)
        nets = dict(vae=AutoencoderKL(**SDXL_VAE), text_encoder=CLIPTextModel(clip(768, 12, 12, "quick_gelu")),
                    text_encoder_2=CLIPTextModelWithProjection(clip(1280, 32, 20, "gelu")),
                    unet=UNet2DConditionModel(**SDXL_UNET))
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(**nets, tokenizer=tok, tokenizer_2=tok, scheduler=scheduler,
                                     add_watermarker=False)
    teacher = root / "teacher"
    pipe.save_config(teacher)  # model_index.json
    pipe.unet.save_config(teacher / "unet")
    pipe.vae.save_config(teacher / "vae")
    ckpt = root / "run" / "checkpoints" / "step-00000000"
    (ckpt / "unet").mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({
        "step": 0, "family": "sdxl", "teacher": str(teacher), "resolution": 1024, "timesteps": [999, 749, 499, 249],
        "num_steps": 4, "generator": "unet", "parameterisation": "eps", "shift": None, "lora": None}))
    return pipe, ckpt


def make_pipeline(model: str, root: Path, device: str, dtype: Any, vae_dtype: Any) -> tuple[Any, Any]:
    """(FewStepPipeline, the teacher's diffusers pipeline sharing its weights)."""
    from inference.checkpoint import CheckpointInfo
    from inference.pipeline import FewStepPipeline, load_pipeline
    from trainer.models import Teacher

    if model == "tiny":
        from inference.testing import make_checkpoint
        from trainer.tiny import tiny_pipeline_dir

        ckpt = make_checkpoint(root / "run", "sdxl", tiny_pipeline_dir("sdxl"))
        fsp = load_pipeline(ckpt, device=device, dtype=dtype, vae_dtype=vae_dtype)
        return fsp, fsp.teacher.pipe
    pipe, ckpt = build_sdxl(root, device)
    info = CheckpointInfo.load(ckpt)
    teacher = Teacher(pipe, "sdxl", info.teacher, info.resolution, None)
    for m in (teacher.denoiser, *teacher.text_encoders()):
        m.to(dtype)
    teacher.vae.to(vae_dtype)
    pipe.set_progress_bar_config(disable=True)
    return FewStepPipeline(info, teacher, dtype), pipe


def timed(fns: dict[str, Callable[[], Any]], rounds: int, sync: Callable[[], None]) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["sdxl", "tiny"], default="sdxl")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--vae-dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--teacher-rounds", type=int, default=2)
    ap.add_argument("--channels-last", action="store_true", help="UNet and VAE in channels-last memory format")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE decoder")
    ap.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    import torch

    from inference.export import DTYPES
    from trainer.models import predict

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        fsp, teacher_pipe = make_pipeline(args.model, Path(tmp), args.device, DTYPES[args.dtype],
                                          DTYPES[args.vae_dtype])
    if args.channels_last:
        fsp.net.to(memory_format=torch.channels_last)
        fsp.teacher.vae.to(memory_format=torch.channels_last)
    if args.compile:
        fsp.net.forward = torch.compile(fsp.net.forward)
        fsp.teacher.vae.decode = torch.compile(fsp.teacher.vae.decode)
    res, f = fsp.info.resolution, fsp.geometry.vae_scale
    cond = fsp.encode([PROMPT], res, res)
    x = torch.randn(1, fsp.geometry.latent_channels, res // f, res // f, device=fsp.device, dtype=fsp.dtype)

    def lower_bound() -> None:
        with torch.no_grad():
            for t in fsp.info.timesteps:
                predict(fsp.net, x, torch.full((1,), t, device=fsp.device, dtype=torch.long), cond, fsp.param)
            fsp.decode(x)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = timed({"end_to_end": lambda: fsp.generate([PROMPT], [0]),
               "k_step": lambda: fsp.decode(fsp.latents([PROMPT], [0], cond=cond)),
               "lower_bound": lower_bound}, args.rounds, sync)
    t["ratio"] = t["k_step"] / t["lower_bound"]
    t["batch4_per_image"] = timed({"b": lambda: fsp.generate([PROMPT] * 4, [0, 1, 2, 3])},
                                  max(2, args.rounds // 3), sync)["b"] / 4
    t["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    gen = torch.Generator().manual_seed(0)
    t["teacher_50_cfg"] = timed({"t": lambda: teacher_pipe(PROMPT, num_inference_steps=50, guidance_scale=5.0,
                                                            output_type="np", generator=gen)},
                                args.teacher_rounds, sync)["t"]
    t["speedup_vs_teacher"] = t["teacher_50_cfg"] / t["end_to_end"]
    t["target_s"] = 0.25
    print(json.dumps(t, indent=2))
    if args.no_write:
        return
    payload = json.loads(args.out.read_text()) if args.out.exists() else {}
    payload["gpu"] = {"command": command_line(), "machine": machine_info(), "model": args.model,
                      "resolution": res, "steps": fsp.info.num_steps, "dtype": args.dtype, "vae_dtype": args.vae_dtype,
                      "channels_last": args.channels_last, "compile": args.compile, "results": t}
    print(f"wrote {write_json(args.out, payload)}", file=sys.stderr)


if __name__ == "__main__":
    main()
