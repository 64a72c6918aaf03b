"""The plan's SD3 (MMDiT) activation estimate against a trace of the real transformer, at two shapes per case."""

from __future__ import annotations

import types

import pytest
import torch

from trainer.plan_act import SD3_TEXT_TOKENS, mmdit_graph_bytes

# The tiny-sd3 transformer (trainer/tiny.py: w = 4 heads x 8, 2 joint blocks) and a wider, deeper one: 8 heads x
# 8 = 64, 3 blocks. The text tokens are the pipeline's 77 + 256 at the first shape, CLIP's 77 alone at the second.
TINY = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
            pos_embed_max_size=16)
WIDER = dict(TINY, num_layers=3, num_attention_heads=8, caption_projection_dim=64, pos_embed_max_size=32)
SHAPES = [(TINY, 16, SD3_TEXT_TOKENS, 4), (WIDER, 32, 77, 8)]  # (config, latent size, text tokens, LoRA rank)


def _traced(cfg: dict, latent: int, text: int, rank: int | None, autocast: bool, ckpt: bool) -> tuple[int, int]:
    """(bytes kept for backward after the forward, peak bytes of forward + backward) beside the parameters, the
    inputs and the output, of the transformer built as the trainer builds the generator (trainable_copy), on fake
    tensors, batch 2."""
    from diffusers import SD3Transformer2DModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from trainer.models import trainable_copy
    from trainer.trace_fake import FreshCopyMode, PeakTracker, fake_module_moves

    def graph(snap: dict) -> int:
        return sum(int(v) for per_dev in snap.values() for k, v in per_dev.items()
                   if getattr(k, "value", k) in ("Activation", "Temp", "Gradient"))

    fake = FakeTensorMode()
    with fake, FreshCopyMode(), fake_module_moves(fake):
        lora = types.SimpleNamespace(rank=rank, alpha=rank, dropout=0.0, target_modules=None) if rank else None
        net = trainable_copy(SD3Transformer2DModel.from_config(cfg), lora, "transformer")
        if ckpt:
            net.enable_gradient_checkpointing()
        x, t = torch.randn(2, 4, latent, latent), torch.full((2,), 500.0)
        emb, pooled = torch.zeros(2, text, cfg["joint_attention_dim"]), torch.zeros(2, cfg["pooled_projection_dim"])
        tracker = PeakTracker()
        tracker.track_external(net, x, t, emb, pooled)
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = net(hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled,
                          return_dict=False)[0]
            # without the prediction itself: the loss's input, not what the graph keeps for backward
            kept = graph(tracker.get_tracker_snapshot("current")) - out.untyped_storage().nbytes()
            out.float().sum().backward()
    peak = tracker.peak()
    return kept, peak["Activation"] + peak["Temp"] + peak["Gradient"]


@pytest.mark.parametrize("rank,autocast", [(4, False), (4, True), (None, False), (None, True)],
                         ids=["lora-fp32", "lora-autocast", "full-fp32", "full-autocast"])
def test_the_mmdit_estimate_follows_a_trace_of_the_real_transformer(rank, autocast):
    # one K per (training, precision) for both shapes: the kept bytes within 5% (measured: within 3.5%)
    for cfg, latent, text, r in SHAPES:
        kept, _ = _traced(cfg, latent, text, rank and r, autocast, ckpt=False)
        planned = mmdit_graph_bytes(cfg, latent, 2, False, autocast=autocast, lora_rank=rank and r,
                                    text_tokens=text)
        assert abs(planned / kept - 1) < 0.05, (cfg["num_layers"], latent, text, planned, kept)


def test_the_text_tokens_are_the_traces_and_a_checkpointed_transformer_keeps_its_blocks_inputs():
    from trainer.trace_fake import TEXT_TOKENS

    assert TEXT_TOKENS["sd3"] == SD3_TEXT_TOKENS
    # checkpointing (sd3-medium-4step-lora: LoRA under bf16 autocast): the forward keeps each block's two input
    # streams, (T + C) x w each; backward recomputes one block at a time, which the plan adds (and stays below
    # the traced peak, which also holds that block's gradient temporaries)
    cfg, latent, text, r = SHAPES[1]
    kept, peak = _traced(cfg, latent, text, r, True, ckpt=True)
    inputs = mmdit_graph_bytes(cfg, latent, 2, True, autocast=True, lora_rank=r, text_tokens=text, recompute=False)
    assert abs(inputs / kept - 1) < 0.05, (inputs, kept)
    assert kept < mmdit_graph_bytes(cfg, latent, 2, True, autocast=True, lora_rank=r, text_tokens=text) < peak


def test_sd3_medium_with_the_levers_agrees_with_its_stored_trace():
    # bench/results/plan_trace/sd3-medium-4step-lora-levers.json: the preset with the SDXL presets' memory levers,
    # traced on 8 fake ranks (its command is stored beside it); the plan is recomputed here from the shipped
    # configs (trainer/arch/sd3-medium), nothing re-traced
    import json
    from pathlib import Path

    from trainer.jobspec import load_spec
    from trainer.plan import make_plan
    from trainer.plan_cli import trace_result

    repo = Path(__file__).resolve().parents[2]
    stored = json.loads((repo / "bench/results/plan_trace/sd3-medium-4step-lora-levers.json").read_text())
    levers = ["memory.text_cache=true", "memory.vae_decode_checkpointing=true", "memory.sam_sdpa=true"]
    assert stored["command"].endswith("".join(f" --set {o}" for o in levers))
    spec = load_spec(repo / "presets/sd3-medium-4step-lora.yaml", levers)
    plan = make_plan(spec, gpus=8)
    traced = trace_result(plan, stored, spec.train.grad_accum)["traced_peak_gib"]
    assert abs(plan.peak_allocated_gib / traced - 1) < 0.05, (plan.peak_allocated_gib, traced)
