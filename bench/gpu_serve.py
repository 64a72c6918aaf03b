"""GPU serving benchmark: each serving option's effect, compile warm-up cold vs from the disk cache,
and images/s at 16 concurrent clients batched vs unbatched. SDXL architecture, 1024², bf16, K = 4.

    python bench/gpu_serve.py --sections compile,options       # in-process sections (~6 min on an H100)
    python bench/gpu_serve.py --sections load                  # the HTTP load section (~5 min); adds to the JSON
    python bench/gpu_serve.py                                  # all three (over one 10-minute slot)
    python bench/gpu_serve.py --dry-run                        # the same code on the CPU, narrow model, 64²

The model is built in memory from the architecture configs in trainer/arch/sdxl-base with random weights (no
download; --dry-run narrows the widths), and goes through `inference.pipeline.serve`, the function
`load_pipeline(..., options=)` uses, so each row is what the service runs with those FLASHDMD_GENERATE_* settings.
Sections:
  options  end-to-end seconds for one image (text encoding of a new prompt, K UNet steps, decode, uint8 on the
           host; median, CUDA-synchronised), cumulatively: eager; +fused QKV; +channels-last; +compile; +tiny VAE
           (a random AutoencoderTiny, TAESD-sized). Also each row's largest pixel difference from eager.
  compile  `inference.serving.warm_up` with compile on, in a fresh process, twice on one cache folder: cold,
           then as a restart would (from the disk cache).
  load     bench/serve_load.py's clients against real servers (the model saved to disk), max_batch 1 vs 16.
Goals printed next to the numbers: batch-1 <= 0.25 s (H100) / 0.22 s (H200) with the full VAE; 16 clients
>= 2.5x unbatched; compile warm-up <= 120 s cold, <= 20 s from the disk cache.
Writes bench/results/gpu_serve.json (--out) and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, command_line, format_table, machine_info, write_json

if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ on the path, not the repo root
    sys.path.insert(0, str(REPO))

ARCH = REPO / "trainer" / "arch" / "sdxl-base"
PROMPT = "a photo of a red fox in the snow, highly detailed"
# Narrow widths for --dry-run: the same builder and code path, seconds on a CPU.
DRY = {"unet": {"sample_size": 8, "block_out_channels": [32, 64, 128], "attention_head_dim": [1, 2, 4],
                "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32},
       "vae": {"sample_size": 64, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
       "text": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
                "projection_dim": 32}}
CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("eager", {}),
    ("+fused QKV", {"fuse_qkv": True}),
    ("+channels-last", {"fuse_qkv": True, "channels_last": True}),
    ("+compile", {"fuse_qkv": True, "channels_last": True, "compile": True}),
    ("+tiny VAE", {"fuse_qkv": True, "channels_last": True, "compile": True, "vae": "tiny"}),
]
COMPILED = dict(CONFIGS)["+compile"]
GOALS = {"batch1_s": {"H100": 0.25, "H200": 0.22}, "load_ratio": 2.5, "compile_cold_s": 120.0, "compile_warm_s": 20.0}


def _config(rel: str, dry: bool) -> dict[str, Any]:
    cfg = {k: v for k, v in json.loads((ARCH / rel).read_text()).items() if not k.startswith("_")}
    if dry:
        part = rel.split("/")[0]
        cfg.update(DRY["text"] if part.startswith("text") else DRY.get(part, {}))
    return cfg


def build(root: Path, device: str, dry: bool) -> tuple[Any, Any]:
    """(CheckpointInfo, Teacher): random weights from the arch configs, built on `device` (seed 0, so every
    build is the same model), and a checkpoint folder (meta.json + configs) that describes it."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from inference.checkpoint import CheckpointInfo
    from trainer.models import Teacher
    from trainer.tiny import build_clip_tokenizer

    tok = build_clip_tokenizer(root / "tokenizer")
    with torch.random.fork_rng(devices=[]), torch.device(device):  # on the GPU: seconds, not minutes
        torch.manual_seed(0)
        nets = dict(unet=UNet2DConditionModel.from_config(_config("unet/config.json", dry)),
                    vae=AutoencoderKL.from_config(_config("vae/config.json", dry)),
                    text_encoder=CLIPTextModel(CLIPTextConfig(**_config("text_encoder/config.json", dry))),
                    text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_config("text_encoder_2/config.json",
                                                                                        dry))))
    sched = EulerDiscreteScheduler.from_config(_config("scheduler/scheduler_config.json", dry))
    pipe = StableDiffusionXLPipeline(**nets, tokenizer=tok, tokenizer_2=tok, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    teacher_dir, ckpt = root / "teacher", root / "run" / "checkpoints" / "step-00000000"
    if not ckpt.is_dir():
        pipe.save_config(teacher_dir)
        for name in ("unet", "vae"):
            getattr(pipe, name).save_config(teacher_dir / name)
        (ckpt / "unet").mkdir(parents=True)
        res = 64 if dry else 1024
        (ckpt / "meta.json").write_text(json.dumps({
            "step": 0, "family": "sdxl", "teacher": str(teacher_dir), "resolution": res, "num_steps": 4,
            "timesteps": [999, 749, 499, 249], "generator": "unet", "parameterisation": "eps", "shift": None,
            "lora": None}))
    info = CheckpointInfo.load(ckpt)
    return info, Teacher(pipe, "sdxl", info.teacher, info.resolution, None)


def tiny_vae(root: Path, dry: bool) -> Path:
    """A random AutoencoderTiny with TAESD's layout (8x, 4 latent channels) saved as a local folder."""
    from diffusers import AutoencoderTiny

    folder = root / "taesd"
    if not folder.is_dir():
        width = (16,) * 4 if dry else (64,) * 4
        AutoencoderTiny(encoder_block_out_channels=width, decoder_block_out_channels=width).save_pretrained(folder)
    return folder


def serving(root: Path, device: str, dry: bool, cache: Path, **over: Any) -> Any:
    from inference.pipeline import serve
    from inference.serving import ServingOptions

    info, teacher = build(root, device, dry)
    if over.get("vae") == "tiny":
        over["tiny_vae_path"] = tiny_vae(root, dry)
    opts = ServingOptions(compile_cache_dir=cache, **over).resolved(device)
    return serve(info, teacher, opts, device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def options_section(args: argparse.Namespace, root: Path, cache: Path) -> list[dict[str, Any]]:
    from inference.serving import warm_up

    rows, reference = [], None
    for name, over in CONFIGS:
        if (args.no_compile and over.get("compile")) or (args.configs and name not in args.configs):
            continue
        pipe = serving(root, args.device, args.dry_run, cache, **over)
        warm = warm_up(pipe)
        res = pipe.info.resolution
        times = []
        for i in range(args.rounds + 2):  # a new prompt every call: text encoding is part of a real request
            sync(args.device)
            t0 = time.perf_counter()
            image = pipe.generate_rows([f"{PROMPT} {i}"], [0], steps=None, width=res, height=res)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        first = pipe.generate_rows([PROMPT], [0], steps=None, width=res, height=res)[0].astype(int)
        reference = first if reference is None else reference
        rows.append({"config": name, "options": over, "batch1_s": statistics.median(times[2:]),
                     "warm_up_s": warm["total_s"], "max_abs_diff_vs_eager": int(abs(first - reference).max()),
                     "image_shape": list(image.shape)})
        print(f"{name}: {rows[-1]['batch1_s']:.4f} s", flush=True)
        del pipe
        gc.collect()
        if args.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
    return rows


def warm_child(args: argparse.Namespace, root: Path, cache: Path) -> dict[str, Any]:
    """One fresh process: build, compile at warm-up with the cache folder, report warm_up's timings."""
    cmd = [sys.executable, str(Path(__file__)), "--child-warm", str(cache), "--root", str(root),
           "--device", args.device] + (["--dry-run"] if args.dry_run else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.child_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"warm-up child failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compile_section(args: argparse.Namespace, root: Path, cache: Path) -> dict[str, Any]:
    cold = warm_child(args, root, cache)
    warm = warm_child(args, root, cache)
    return {"cold_s": cold["total_s"], "from_disk_cache_s": warm["total_s"], "cold": cold, "from_disk_cache": warm}


def load_section(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Save the model as a checkpoint on disk and run bench/serve_load.py's clients against real servers."""
    import serve_load
    import torch

    info, teacher = build(root, "cpu" if args.dry_run else args.device, args.dry_run)
    model = root / "saved"
    ckpt = model / "run" / "checkpoints" / "step-00000000"
    if not ckpt.is_dir():
        pipe, tdir = teacher.pipe, model / "teacher"
        pipe.save_config(tdir)
        for name in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "scheduler"):
            getattr(pipe, name).save_pretrained(tdir / name)
        pipe.unet.save_config(tdir / "unet")  # the generator's weights live in the checkpoint only
        pipe.unet.to(dtype=torch.bfloat16).save_pretrained(ckpt / "unet")
        meta = json.loads((info.path / "meta.json").read_text())
        (ckpt / "meta.json").write_text(json.dumps({**meta, "teacher": str(tdir)}))
    del info, teacher
    gc.collect()
    load = argparse.Namespace(clients=args.clients, requests=args.requests, seconds=args.seconds, max_wait_ms=10.0,
                              steps=None, width=None, height=None, threads=1 if args.dry_run else None,
                              device=args.device, dtype=None)
    db, token, checkpoint, allowed = serve_load.prepare(root, str(ckpt))
    out: dict[str, Any] = {}
    for mode, max_batch in (("unbatched", 1), ("batched", args.clients)):
        env = serve_load.server_env(load, root, db, allowed, max_batch, None)
        env.update({"FLASHDMD_GENERATE_FUSE_QKV": "true", "FLASHDMD_GENERATE_CHANNELS_LAST": "true",
                    "FLASHDMD_GENERATE_MAX_CONCURRENCY": "1"})
        out[mode] = {"max_batch": max_batch, **serve_load.run_mode(load, env, token, checkpoint, root / f"{mode}.log")}
        print(f"load {mode}: {out[mode]['images_per_s']:.2f} images/s", flush=True)
    out["ratio"] = out["batched"]["images_per_s"] / max(out["unbatched"]["images_per_s"], 1e-9)
    return out


def card(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    name = torch.cuda.get_device_name()
    return next((k for k in ("H200", "H100") if k in name), name)


def report(results: dict[str, Any], gpu: str | None) -> str:
    goal = GOALS["batch1_s"].get(gpu or "", None)
    lines = []
    if "options" in results:
        rows = [(r["config"], r["batch1_s"], r["warm_up_s"], r["max_abs_diff_vs_eager"]) for r in results["options"]]
        lines.append(format_table(("config (cumulative)", "batch-1 s", "warm-up s", "max |Δ| vs eager (0-255)"),
                                  rows))
        full = [r for r in results["options"] if r["options"].get("vae") != "tiny"]
        best = min(r["batch1_s"] for r in full)
        lines.append(f"best batch-1 with the full VAE: {best:.4f} s; goal <= "
                     + (f"{goal} s on this {gpu}: {'met' if best <= goal else 'NOT met'}" if goal else
                        "0.25 s (H100) / 0.22 s (H200): not a GPU run"))
    if "compile" in results:
        c = results["compile"]
        lines.append(f"compile warm-up: cold {c['cold_s']:.1f} s (goal <= {GOALS['compile_cold_s']:.0f}), from the "
                     f"disk cache {c['from_disk_cache_s']:.1f} s (goal <= {GOALS['compile_warm_s']:.0f})")
    if "load" in results:
        ld = results["load"]
        lines.append(f"{ld['batched']['max_batch']} clients: batched {ld['batched']['images_per_s']:.2f} images/s, unbatched "
                     f"{ld['unbatched']['images_per_s']:.2f}: {ld['ratio']:.2f}x (goal >= {GOALS['load_ratio']}x)")
    return "\n".join(lines)


def child_main(args: argparse.Namespace) -> None:
    import os

    from inference.serving import warm_up

    # Inductor's cache folder is process-wide: a serving process sets it before its first compile (as the API's
    # pipeline loader does), so the second child finds the first one's kernels.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.child_warm).absolute())
    pipe = serving(Path(args.root), args.device, args.dry_run, Path(args.child_warm), **COMPILED)
    out = warm_up(pipe)
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, narrow model, 64²: the code path, not the numbers")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--sections", default="options,compile,load")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows of the options section")
    ap.add_argument("--configs", default=None, help="options section: a comma-separated subset of "
                    f"{[name for name, _ in CONFIGS]} (default: all)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=320, help="per load mode, at most")
    ap.add_argument("--seconds", type=float, default=120.0, help="per load mode, at most")
    ap.add_argument("--child-timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_serve.json")
    ap.add_argument("--child-warm", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    names = [name for name, _ in CONFIGS]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else None
    if args.configs is not None and (not args.configs or set(args.configs) - set(names)):
        ap.error(f"--configs: choose from {names}")
    if args.child_warm:
        return child_main(args)
    if args.device.startswith("cuda"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        cache = root / "compile-cache"
        # The compile section runs first, so its cold number is truly cold; the options section then
        # compiles from the same cache (its warm-up column says how long that took).
        if "compile" in sections:
            results["compile"] = compile_section(args, root, cache)
        if "options" in sections:
            results["options"] = options_section(args, root, cache)
        if "load" in sections:
            results["load"] = load_section(args, root)
    gpu = card(args.device)
    # Sections run as separate commands (each fits a 10-minute slot) add to one file on the same card.
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if earlier.get("gpu") == gpu and earlier.get("dry_run") == args.dry_run:
        results = {**earlier.get("results", {}), **results}
    table = report(results, gpu)
    write_json(args.out, {"command": command_line(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                          "machine": machine_info(), "gpu": gpu, "dry_run": args.dry_run,
                          "model": "SDXL architecture (trainer/arch/sdxl-base), random weights"
                          + (", narrowed (--dry-run)" if args.dry_run else ""), "goals": GOALS, "results": results})
    print(table)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
