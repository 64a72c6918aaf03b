"""`flashdmd train` as a user runs it: presets, outputs, loading the result in diffusers, stop/resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from trainer.sink import read_metrics

pytestmark = pytest.mark.e2e

REQUIRED = ("loss/dm", "loss/fake_score", "loss/disc", "loss/gen_adv", "grad_norm/generator",
            "grad_norm/fake_score")


def _events(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def _check_run(run_dir, steps: int, family: str, flash: bool = True) -> None:
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["max_steps"] == steps
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    seen = set().union(*(r["metrics"] for r in rows))
    for key in REQUIRED + (("grad_norm/discriminator",) if flash else ()):
        assert key in seen, key
    grids = sorted((run_dir / "samples").glob("*.png"))
    assert grids and Image.open(grids[-1]).size[0] > 0
    ckpt = run_dir / "checkpoints" / f"step-{steps:08d}"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == steps and meta["family"] == family
    assert _events(run_dir)[-1]["kind"] == "finished"


def _teacher_dir(cli_env, family: str):
    from trainer.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir(family, cache_root=cli_env["FLASHDMD_CACHE"])


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_preset_trains_and_checkpoint_loads_in_diffusers(run_cli, cli_env, tmp_path, family):
    run_dir = tmp_path / "run"
    res = run_cli(f"presets/tiny-{family}.yaml", "--run-dir", str(run_dir), "--set", "train.max_steps=20")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_run(run_dir, 20, family)

    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    unet = diffusers.UNet2DConditionModel.from_pretrained(run_dir / "checkpoints" / "step-00000020" / "unet")
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd15" else {}
    pipe = cls.from_pretrained(_teacher_dir(cli_env, family), unet=unet, **extra)
    teacher_unet = diffusers.UNet2DConditionModel.from_pretrained(_teacher_dir(cli_env, family), subfolder="unet")
    name = next(n for n, _ in unet.named_parameters() if "conv_out" in n)
    assert not torch.equal(dict(unet.named_parameters())[name], dict(teacher_unet.named_parameters())[name])
    img = pipe("a handwritten digit three", num_inference_steps=4, guidance_scale=0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(img)).all()


def test_sd3_lora_preset_trains_and_loads_with_load_lora_weights(run_cli, cli_env, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("presets/tiny-sd3.yaml", "--run-dir", str(run_dir), "--set", "train.max_steps=20",
                  "--set", "model.lora.alpha=2")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_run(run_dir, 20, "sd3")
    lora_dir = run_dir / "checkpoints" / "step-00000020" / "lora"
    assert list(lora_dir.glob("*.safetensors"))

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(_teacher_dir(cli_env, "sd3"))
    gen = torch.Generator().manual_seed(0)
    base = pipe("a digit", num_inference_steps=2, guidance_scale=1.0, output_type="np", generator=gen).images
    pipe.load_lora_weights(lora_dir)
    # the adapter metadata travels with the file, so diffusers uses alpha 2 (scale 0.5), not alpha = rank
    assert [(c.r, c.lora_alpha) for c in pipe.transformer.peft_config.values()] == [(4, 2.0)]
    gen = torch.Generator().manual_seed(0)
    tuned = pipe("a digit", num_inference_steps=2, guidance_scale=1.0, output_type="np", generator=gen).images
    assert tuned.shape == (1, 32, 32, 3)
    assert not (base == tuned).all(), "the LoRA had no effect"


def test_dmd2_mode_trains(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("presets/tiny-sdxl.yaml", "--run-dir", str(run_dir), "--set", "train.max_steps=20",
                  "--set", "distill.mode=dmd2")
    assert res.returncode == 0, res.stderr[-3000:]
    _check_run(run_dir, 20, "sdxl", flash=False)
    rows = read_metrics(run_dir)
    turns = [r["step"] for r in rows if r["metrics"]["generator_turn"] == 1.0]
    assert turns == [1, 6, 11, 16], "TTUR 5: the generator updates on every fifth iteration"


def test_stop_then_resume_continues_from_the_checkpoint(run_cli, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()  # the worker's cancel signal: stop at the first step boundary
    args = ("presets/tiny-sdxl.yaml", "--run-dir", str(run_dir), "--set", "train.max_steps=8",
            "--set", "train.checkpoint_every=100", "--set", "train.sample_every=100")
    res = run_cli(*args)
    assert res.returncode == 3, res.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step-00000001" / "meta.json").is_file()
    assert _events(run_dir)[-1]["kind"] == "stopped"

    (run_dir / "STOP").unlink()
    res = run_cli(*args, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    started = [e for e in _events(run_dir) if e["kind"] == "started"]
    assert started[-1]["data"] == {"step": 1, "max_steps": 8, "resumed": True, "family": "sdxl",
                                   "num_processes": 1, "grad_accum": 1, "sharding": "ddp"}
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, 9)), "no duplicate and no gap after the resume point"


def test_bad_spec_exits_2_and_names_the_field(run_cli, tmp_path):
    res = run_cli("presets/tiny-sdxl.yaml", "--set", "train.max_steps=-1", "--run-dir", str(tmp_path))
    assert res.returncode == 2
    assert "train.max_steps" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("presets/tiny-sdxl.yaml", "--set", "distill.tturr=2", "--run-dir", str(tmp_path))
    assert res.returncode == 2 and "distill.tturr" in res.stderr


def test_missing_teacher_path_is_a_clear_error(run_cli, tmp_path):
    res = run_cli("presets/tiny-sdxl.yaml", "--set", f"model.teacher={tmp_path}/no-such-model",
                  "--run-dir", str(tmp_path / "run"))
    assert res.returncode == 2
    assert "model.teacher: no such folder" in res.stderr and "Traceback" not in res.stderr


def test_console_script_dry_run(cli_env, tmp_path):
    exe = shutil.which("flashdmd")
    cmd = [exe] if exe else [sys.executable, "-c", "from api.cli import main; main()"]
    res = subprocess.run([*cmd, "train", "presets/tiny-sdxl.yaml", "--dry-run", "--set", "schedule.num_steps=2"],
                         capture_output=True, text=True, env=cli_env, timeout=120,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["schedule"]["timesteps"] == [999, 499]
