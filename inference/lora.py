"""LoRA files: read a checkpoint's adapter, and rename it to kohya/ComfyUI keys.

The trainer saves LoRA with the pipeline's `save_lora_weights` (PEFT keys such as
`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`).
That file carries no `lora_alpha`, and without it diffusers assumes alpha = rank;
so the adapter config is rebuilt from meta.json and attached as diffusers'
`lora_adapter_metadata` wherever we load or export.

kohya/ComfyUI keys (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`):
ComfyUI's `model_lora_keys_unet` accepts `lora_unet_` + the underscored name of any
weight in its own (original Stable Diffusion, "ldm") UNet, and kohya's sd-scripts and
A1111 write/read the same ldm names for SDXL. So UNet modules are renamed to the ldm
layout (`input_blocks.4.1.transformer_blocks.0.attn1.to_q` ...). SD3 has no ldm
UNet; ComfyUI maps `lora_transformer_` + the underscored diffusers name (OneTrainer's
format) onto its MMDiT, so that is what SD3 gets. The scale is alpha / rank, as in PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from inference.checkpoint import CheckpointError, CheckpointInfo

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key for the LoraConfig

# ldm ResBlock sub-modules, by their diffusers ResnetBlock2D names.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def lora_file(info: CheckpointInfo) -> Path:
    files = sorted((info.path / "lora").glob("*.safetensors"))
    if len(files) != 1:
        raise CheckpointError(f"{info.path}/lora should hold one .safetensors file, found {len(files)}")
    return files[0]


def read_lora(info: CheckpointInfo) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(PEFT-keyed state dict with the `unet.`/`transformer.` prefix, prefixed adapter metadata)."""
    path = lora_file(info)
    state = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    prefix = info.denoiser_name
    if raw:
        return state, json.loads(raw)
    return state, {f"{prefix}.{k}": v for k, v in adapter_config(state, prefix, info.lora).items()}


def adapter_config(state: dict[str, torch.Tensor], prefix: str, lora: dict[str, Any] | None) -> dict[str, Any]:
    """The LoraConfig kwargs diffusers would infer from the keys, plus the alpha it cannot infer."""
    modules = sorted({k.removeprefix(f"{prefix}.").split(".lora_A.")[0] for k in state if ".lora_A." in k})
    if not modules:
        raise CheckpointError(f"the LoRA file has no `{prefix}.*.lora_A` weights")
    ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    rank = int((lora or {}).get("rank") or max(ranks))
    if ranks != {rank}:
        raise CheckpointError(f"LoRA ranks {sorted(ranks)} do not match meta.json's rank {rank}")
    alpha = float((lora or {}).get("alpha") or rank)
    return {"r": rank, "lora_alpha": alpha, "target_modules": modules}


def ldm_unet_names(config: dict[str, Any]) -> dict[str, str]:
    """diffusers UNet2DConditionModel block prefixes -> original SD (ldm) prefixes, for this config."""
    n = len(config["block_out_channels"])
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise CheckpointError("kohya export needs the same layers_per_block in every UNet block")
    names = dict(_TOP)
    for i in range(n):
        for j in range(per_block):  # ldm numbers input blocks 1.. with one slot per layer plus a downsampler
            k = 1 + i * (per_block + 1) + j
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{k}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
        if i < n - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{1 + i * (per_block + 1) + per_block}.0.op"
    names.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                  "mid_block.resnets.1": "middle_block.2"})
    for i, kind in enumerate(config["up_block_types"]):
        for j in range(per_block + 1):  # up blocks have one more layer than down blocks
            k = i * (per_block + 1) + j
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{k}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
        if i < n - 1:  # the upsampler follows the attention in the last slot, if there is one
            slot = 2 if "CrossAttn" in kind else 1
            names[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (per_block + 1) + per_block}.{slot}.conv"
    return names


def to_ldm(module: str, names: dict[str, str]) -> str:
    """One diffusers UNet module path -> its ldm path (`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`)."""
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in names:
            rest = parts[cut:]
            if ".resnets." in f".{head}." and rest:
                rest = [_RESNET.get(rest[0], rest[0]), *rest[1:]]
            return ".".join([names[head], *rest])
    raise CheckpointError(f"no ldm name for UNet module {module!r}")


def to_kohya(state: dict[str, torch.Tensor], metadata: dict[str, Any], prefix: str,
             unet_config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """PEFT LoRA (prefixed keys) -> kohya keys. `unet_config` is needed for UNets (ldm names)."""
    cfg = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    alpha, alphas = float(cfg.get("lora_alpha", 0) or 0), dict(cfg.get("alpha_pattern") or {})
    names = ldm_unet_names(unet_config) if prefix == "unet" else None
    if prefix == "unet" and unet_config is None:
        raise ValueError("to_kohya needs the UNet config for UNet LoRA")
    out: dict[str, torch.Tensor] = {}
    for key, down in state.items():
        if not key.startswith(f"{prefix}.") or ".lora_A." not in key:
            continue
        module = key.removeprefix(f"{prefix}.").split(".lora_A.")[0]
        up = state[key.replace(".lora_A.", ".lora_B.")]
        rank = int(down.shape[0])
        a = float(alphas.get(module, alpha or rank))
        if cfg.get("use_rslora"):  # PEFT scales by alpha/sqrt(r); kohya always divides by r
            a *= rank**0.5
        if names is not None:
            name = "lora_unet_" + to_ldm(module, names).replace(".", "_")
        else:
            name = "lora_transformer_" + module.replace(".", "_")
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        out[f"{name}.alpha"] = torch.tensor(a, dtype=torch.float32)
    if not out:
        raise CheckpointError(f"the LoRA file has no `{prefix}.` weights to convert")
    return out
