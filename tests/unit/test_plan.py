"""`flashdmd plan`: figures counted on the meta device match the real networks, and the levers move them."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from click.testing import CliRunner

from trainer.distill import Distiller
from trainer.jobspec import load_spec
from trainer.models import load_teacher
from trainer.optim import optimizer_state_bytes
from trainer.plan import GIB, load_arch, make_plan
from trainer.plan_cli import plan_command

SDXL_PRESET = "presets/sdxl-4step.yaml"


def _bytes(module: torch.nn.Module, grads: bool = False) -> int:
    if grads:
        return sum(p.grad.numel() * p.grad.element_size() for p in module.parameters() if p.grad is not None)
    return (sum(p.numel() * p.element_size() for p in module.parameters())
            + sum(b.numel() * b.element_size() for b in module.buffers() if b.is_floating_point()))


def test_tiny_sdxl_figures_match_a_cpu_measurement(tiny_dir):
    cfg = load_spec("presets/tiny-sdxl.yaml", [f"model.teacher={tiny_dir('sdxl')}"])
    plan = make_plan(cfg, gpus=1).figures()
    d = Distiller.for_job(cfg, load_teacher(cfg.model), Accelerator(cpu=True))
    for opt in d.optimizers().values():  # one optimiser step each: the states now exist, as after a step
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        opt.step()
    measured = {
        "generator weights": _bytes(d.generator), "fake_score weights": _bytes(d.fake),
        "discriminator weights": _bytes(d.disc.heads),
        "generator optimiser": optimizer_state_bytes(d.opt_g), "fake_score optimiser": optimizer_state_bytes(d.opt_f),
        "discriminator optimiser": optimizer_state_bytes(d.opt_d),
        "teacher unet": _bytes(d.teacher.denoiser), "vae": _bytes(d.teacher.vae),
        "text encoders": sum(_bytes(m) - sum(b.numel() * b.element_size() for b in m.buffers()
                                             if b.is_floating_point()) for m in d.teacher.text_encoders()),
        "sam encoder": sum(p.numel() * p.element_size() for p in d.disc.encoder.parameters()),
    }
    # gradients: one backward through the generator, as its update does
    d.opt_g.zero_grad(set_to_none=True)
    sum(p.float().sum() for p in d.generator.parameters()).backward()
    measured["generator gradients"] = _bytes(d.generator, grads=True)
    for name, value in measured.items():
        assert value > 0, name
        assert plan[name] == pytest.approx(value, rel=0.01), name


def test_plan_counts_on_the_meta_device_and_levers_move_the_budget():
    arch = load_arch("stabilityai/stable-diffusion-xl-base-1.0")  # the shipped configs: no hub here
    assert all(p.device.type == "meta" for p in arch.denoiser.parameters())
    assert sum(p.numel() for p in arch.denoiser.parameters()) == 2_567_463_684  # SDXL base UNet
    base = load_spec(SDXL_PRESET, ["optim.optimizer=adamw", "memory.text_cache=false", "train.batch_size=1",
                                   "memory.vae_decode_checkpointing=false", "memory.sam_sdpa=false"])
    p0 = make_plan(base, gpus=1, arch=arch)
    f0 = p0.figures()
    assert f0["generator optimiser"] / GIB == pytest.approx(2_567_463_684 * 8 / GIB, rel=1e-3)
    assert not p0.fits, "full-weight SDXL with fp32 AdamW does not fit 80 GB (it peaked at 89 GiB on an H200)"
    p8 = make_plan(base.model_copy(update={"optim": base.optim.model_copy(update={"optimizer": "adamw8bit"})}),
                   gpus=1, arch=arch)
    assert p8.figures()["generator optimiser"] == pytest.approx(f0["generator optimiser"] / 4, rel=0.03)
    cached = load_spec(SDXL_PRESET, ["memory.text_cache=true"])
    assert make_plan(cached, gpus=1, arch=arch).figures()["text encoders"] == 0
    fsdp = load_spec("presets/sdxl-4step-8gpu.yaml")
    ddp8 = load_spec("presets/sdxl-4step-8gpu.yaml", ["train.sharding=ddp"])
    ff, fd = make_plan(fsdp, arch=arch).figures(), make_plan(ddp8, arch=arch).figures()
    for row in ("generator weights", "generator optimiser", "fake_score optimiser"):
        assert ff[row] == pytest.approx(fd[row] / 8), row
    assert ff["generator gradients"] == 4 * 2_567_463_684, "accumulated without reduce-scatter: unsharded"
    assert "generator gradients" not in fd, "DDP: the gradients are views into the buckets (a state row)"
    assert fd["generator DDP gradient buckets"] == 4 * 2_567_463_684
    assert ff["teacher unet"] == fd["teacher unet"], "frozen nets are not sharded"
    # gradient accumulation: only the running phase's network holds gradients, added to its graph
    one = make_plan(load_spec(SDXL_PRESET, ["train.grad_accum=1"]), gpus=1, arch=arch)
    many = make_plan(load_spec(SDXL_PRESET, ["train.grad_accum=8"]), gpus=1, arch=arch)
    assert "fake_score gradients" not in many.figures() and "fake_score gradients" not in one.figures()
    assert many.peak_allocated_gib > one.peak_allocated_gib


@pytest.mark.parametrize("preset,gpus", [(SDXL_PRESET, 1), ("presets/sdxl-4step-8gpu.yaml", 8),
                                         ("presets/sdxl-rl-4step.yaml", 1)])
def test_the_sdxl_presets_fit_80_gb(preset, gpus):
    plan = make_plan(load_spec(preset), gpus=gpus, gpu_mem_gib=80)
    assert plan.fits and plan.peak_allocated_gib <= 72, plan.peak_allocated_gib


def test_plan_command_prints_the_table_and_exits_by_verdict():
    runner = CliRunner()
    ok = runner.invoke(plan_command, [SDXL_PRESET, "--gpus", "1"])
    assert ok.exit_code == 0, ok.output
    assert "| generator optimiser |" in ok.output and "FITS" in ok.output
    tight = runner.invoke(plan_command, [SDXL_PRESET, "--gpu-mem-gib", "24"])
    assert tight.exit_code == 1 and "DOES NOT FIT" in tight.output
    bad = runner.invoke(plan_command, [SDXL_PRESET, "--set", "optim.optimizer=sgd"])
    assert bad.exit_code == 2 and "optim.optimizer" in bad.output


def test_train_dry_run_shows_the_plan():
    import json

    from flashjob.cli import train_command

    out = CliRunner().invoke(train_command, [SDXL_PRESET, "--dry-run"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["memory"]["text_cache"] is True, "stdout stays the resolved JSON"
    assert "| teacher unet |" in out.stderr and "peak allocated" in out.stderr


def test_lora_figures_match_peft(make_cfg):
    cfg = make_cfg("sd3")  # flow transformer, generator and fake score as LoRA adapters (rank 2)
    plan = make_plan(cfg, gpus=1).figures()
    d = Distiller.for_job(cfg, load_teacher(cfg.model), Accelerator(cpu=True))
    for p in d.generator.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    d.opt_g.step()
    assert plan["generator weights"] == pytest.approx(_bytes(d.generator), rel=0.01)
    assert plan["generator optimiser"] == pytest.approx(optimizer_state_bytes(d.opt_g), rel=0.01)
    assert optimizer_state_bytes(d.opt_g) < 0.5 * _bytes(d.generator), "only the adapters have states"
