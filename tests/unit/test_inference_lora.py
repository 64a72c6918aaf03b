"""LoRA export in kohya/ComfyUI keys: every key maps back to a UNet module, and diffusers loads it as ours."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from inference.checkpoint import CheckpointInfo
from inference.export import export_checkpoint
from inference.lora import ldm_unet_names, to_ldm
from inference.testing import make_checkpoint

# SDXL-base's UNet layout (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), built on the meta device.
SDXL_BASE = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def ldm_state(unet: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The UNet's state dict under original-SD names (what ComfyUI's model holds as diffusion_model.*)."""
    names = ldm_unet_names(dict(unet.config))
    out = {}
    for key, value in (state if state is not None else unet.state_dict()).items():
        module, _, leaf = key.rpartition(".")
        out[f"{to_ldm(module, names)}.{leaf}"] = value
    return out


def _unets(tiny_dir):  # noqa: ANN001, ANN202
    from diffusers import UNet2DConditionModel

    yield "tiny-sdxl", UNet2DConditionModel.from_pretrained(tiny_dir("sdxl"), subfolder="unet")
    yield "tiny-sd15", UNet2DConditionModel.from_pretrained(tiny_dir("sd15"), subfolder="unet")
    with torch.device("meta"):
        yield "sdxl-base", UNet2DConditionModel(**SDXL_BASE)


def test_ldm_names_agree_with_diffusers_own_ldm_converter(tiny_dir):
    """diffusers' single-file loader converts ldm -> diffusers independently of us: the round trip is exact."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    for label, unet in _unets(tiny_dir):
        original = unet.state_dict()
        ours = ldm_state(unet, original)
        back = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in ours.items()},
                                           dict(unet.config))
        assert set(back) == set(original), label
        assert all(back[k] is original[k] for k in original), f"{label}: a tensor landed on the wrong key"


@pytest.fixture(scope="module")
def sdxl_lora(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-lora")
    ckpt = make_checkpoint(root / "run", "sdxl", tiny_dir("sdxl"), lora={"rank": 4, "alpha": 2.0})
    info = CheckpointInfo.load(ckpt)
    kohya_dir = export_checkpoint(info, "lora-kohya", root / "kohya")
    peft_dir = export_checkpoint(info, "lora", root / "peft")
    return info, next(kohya_dir.glob("*.safetensors")), peft_dir


def test_every_kohya_key_maps_back_to_a_unet_module(sdxl_lora, tiny_dir):
    """ComfyUI's rule (comfy/lora.py model_lora_keys_unet): `lora_unet_` + an ldm weight name with dots as
    underscores. Build that map from the ldm view of the UNet and resolve every key through it."""
    from diffusers import UNet2DConditionModel

    _, kohya_file, _ = sdxl_lora
    unet = UNet2DConditionModel.from_pretrained(tiny_dir("sdxl"), subfolder="unet")
    weights = {k: v for k, v in ldm_state(unet).items() if k.endswith(".weight")}
    key_map = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): k for k in weights}
    state = load_file(str(kohya_file))
    bases = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state}
    assert bases and all(b.startswith("lora_unet_") for b in bases)
    assert any("input_blocks" in b for b in bases) and any("output_blocks" in b for b in bases)
    assert any("middle_block" in b for b in bases)
    for base in bases:
        assert base in key_map, f"{base} names no UNet weight"
        target = weights[key_map[base]]
        down, up = state[f"{base}.lora_down.weight"], state[f"{base}.lora_up.weight"]
        assert (up.shape[0], down.shape[1]) == tuple(target.shape[:2]), base
        assert state[f"{base}.alpha"].item() == 2.0
    assert len(state) == 3 * len(bases)
    # Every adapted module of the checkpoint is there: one kohya module per lora_A in the PEFT file.
    peft = load_file(str(next(sdxl_lora[2].glob("*.safetensors"))))
    assert len(bases) == sum(".lora_A." in k for k in peft)


def test_diffusers_loads_the_kohya_file_like_the_peft_file(sdxl_lora, tiny_dir):
    """diffusers' kohya converter (sgm block names -> diffusers) is a second, independent reader."""
    from diffusers import StableDiffusionXLPipeline

    _, kohya_file, peft_dir = sdxl_lora
    outs = []
    for source in (None, peft_dir, kohya_file):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir("sdxl"))
        pipe.set_progress_bar_config(disable=True)
        if source is not None:
            pipe.load_lora_weights(str(source))
        outs.append(pipe("a cat", num_inference_steps=2, guidance_scale=0, output_type="latent",
                         generator=torch.Generator().manual_seed(0)).images)
    base, peft, kohya = outs
    assert (peft - base).abs().max() > 1e-2, "the LoRA must change the output"
    assert (kohya - peft).abs().max() < 1e-5


def test_sd3_kohya_keys_are_comfyui_transformer_names(tiny_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    ckpt = make_checkpoint(tmp_path / "run", "sd3", tiny_dir("sd3"), lora={"rank": 4, "alpha": 4.0})
    out = export_checkpoint(CheckpointInfo.load(ckpt), "lora-kohya", tmp_path / "kohya")
    state = load_file(str(next(out.glob("*.safetensors"))))
    net = SD3Transformer2DModel.from_pretrained(tiny_dir("sd3"), subfolder="transformer")
    modules = {"lora_transformer_" + n.replace(".", "_"): m for n, m in net.named_modules()}
    bases = {k.rsplit(".", 2)[0] for k in state if k.endswith(".lora_down.weight")}
    assert bases and all(b in modules and hasattr(modules[b], "weight") for b in bases)


def test_full_checkpoints_refuse_lora_formats(tiny_dir, tmp_path):
    from inference.checkpoint import CheckpointError

    ckpt = make_checkpoint(tmp_path / "run", "sdxl", tiny_dir("sdxl"))
    with pytest.raises(CheckpointError, match="needs a LoRA checkpoint"):
        export_checkpoint(ckpt, "lora-kohya", tmp_path / "x")
