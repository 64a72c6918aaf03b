"""FSDP2's traffic per iteration on 2 gloo ranks (the real Distiller.step, counted by bench/fsdp_comm.py),
and its shard units."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = pytest.mark.slow


def test_an_iteration_gathers_each_network_once_per_phase_in_bf16(dist_env, monkeypatch):
    # bf16, 2 micro-batches: G gathered once for its phase (simulation, rollouts, backward), the frozen fake
    # score once per micro-batch for Eq. 4 and once for its own phase: 4 bf16 copies of one UNet. Before,
    # every forward and backward regathered in fp32: 2 micro-batches x ~9 gathers x 4 bytes.
    import fsdp_comm

    for key, value in dist_env.items():
        monkeypatch.setenv(key, value)
    out = fsdp_comm.run_tiny(["train.batch_size=1", "train.grad_accum=2", "train.mixed_precision=bf16"], "after", 1)
    unet_bf16 = out["unet_params"] * 2  # one UNet's parameters x 2 bytes
    gathered = out["real"]["all_gather"]
    assert 3.8 * unet_bf16 < gathered < 4.2 * unet_bf16, (gathered, unet_bf16)
    assert out["real"]["reduce_scatter"] >= 2 * out["unet_params"] * 4, "fp32 reduce-scatter of both networks"


def test_shard_units_are_resnet_and_transformer_blocks_before_their_containers():
    from diffusers import UNet2DConditionModel

    from trainer.parallel import UNIT_CLASSES, shard_blocks

    config = UNet2DConditionModel.load_config(str(Path(__file__).resolve().parents[2] / "trainer" / "arch" /
                                                  "sdxl-base" / "unet"))
    config.update(block_out_channels=[8, 16, 16], transformer_layers_per_block=[1, 2, 2], cross_attention_dim=16,
                  attention_head_dim=[2, 2, 2], addition_time_embed_dim=4, projection_class_embeddings_input_dim=28,
                  norm_num_groups=4, sample_size=8)
    net = UNet2DConditionModel.from_config(config)
    units = shard_blocks(net)
    names = {id(m): n for n, m in net.named_modules()}
    order = [names[id(m)] for m in units]
    leaves = [n for n, m in net.named_modules() if type(m).__name__ in UNIT_CLASSES]
    assert sorted(n for n in order if n in leaves) == sorted(leaves), "every ResNet and transformer block"
    assert len(order) == len(leaves) + len(net.down_blocks) + len(net.up_blocks) + 1
    for i, name in enumerate(order):  # a unit comes before the block that contains it
        assert not any(other.startswith(name + ".") for other in order[i + 1:]), name
    # forward order inside a block: resnet i, then attention i's transformer blocks
    d1 = [n for n in order if n.startswith("down_blocks.1.")]
    assert d1 == ["down_blocks.1.resnets.0", "down_blocks.1.attentions.0.transformer_blocks.0",
                  "down_blocks.1.attentions.0.transformer_blocks.1", "down_blocks.1.resnets.1",
                  "down_blocks.1.attentions.1.transformer_blocks.0", "down_blocks.1.attentions.1.transformer_blocks.1"]
