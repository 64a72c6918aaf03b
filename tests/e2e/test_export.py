"""`flashdmd generate` and `flashdmd export` on checkpoints the trainer really wrote, checked by scripts that
import only torch and diffusers (as a user outside flashdmd would)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a handwritten digit three"
SEED = 3

# A user's script: nothing of ours is importable from its working directory, and it checks that.
_HEADER = """
import json, sys
import numpy as np
import torch
args = json.loads(sys.argv[1])
"""
_FOOTER = """
assert not any(m.split(".")[0] in ("inference", "trainer", "api") for m in sys.modules), "imported flashdmd"
"""


def _flashdmd(cli_env, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from api.cli import main; main()", *args]
    return subprocess.run(cmd, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=timeout)


def _user_script(tmp_path: Path, body: str, args: dict, env: dict) -> None:
    script = tmp_path / "user_script.py"
    script.write_text(_HEADER + textwrap.dedent(body) + _FOOTER)
    clean = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(script), json.dumps(args)], cwd=tmp_path, env=clean,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="session")
def runs(run_cli, tmp_path_factory) -> dict[str, Path]:
    """One real training run per kind (1 step, checkpoint at the end), built once for the session."""
    root = tmp_path_factory.mktemp("export-runs")
    specs = {
        "sdxl": ("presets/tiny-sdxl.yaml",),
        "sdxl-lora": ("presets/tiny-sdxl.yaml", "--set", "model.lora.rank=4", "--set", "model.lora.alpha=2"),
        "sd3-lora": ("presets/tiny-sd3.yaml", "--set", "model.lora.alpha=2"),
    }
    out = {}
    for name, (preset, *extra) in specs.items():
        run_dir = root / name
        res = run_cli(preset, "--run-dir", str(run_dir), "--set", "train.max_steps=1", "--set",
                      "train.checkpoint_every=1", "--set", "train.sample_every=1", *extra)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = run_dir
    return out


def _teacher(cli_env, family: str) -> str:
    from trainer.tiny import tiny_pipeline_dir

    return str(tiny_pipeline_dir(family, cache_root=cli_env["FLASHDMD_CACHE"]))


def test_generate_writes_the_same_png_for_the_same_seed(runs, cli_env, tmp_path):
    outs = []
    for i in range(2):
        res = _flashdmd(cli_env, "generate", "--checkpoint", str(runs["sdxl"]), "--prompt", PROMPT,
                        "--seed", str(SEED), "-o", str(tmp_path / f"out{i}.png"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"seed={SEED}" in res.stdout
        outs.append((tmp_path / f"out{i}.png").read_bytes())
    assert outs[0] == outs[1]
    assert Image.open(tmp_path / "out0.png").size == (32, 32)
    res = _flashdmd(cli_env, "generate", "--checkpoint", str(runs["sdxl"]), "--prompt", PROMPT, "-n", "2",
                    "--seed", "7", "-o", str(tmp_path / "many.webp"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert Image.open(tmp_path / "many-8.webp").format == "WEBP"


def test_generate_by_job_id_reads_the_service_storage_root(runs, cli_env, tmp_path):
    storage = tmp_path / "storage"
    (storage / "jobs").mkdir(parents=True)
    (storage / "jobs" / "j_test").symlink_to(runs["sdxl"], target_is_directory=True)
    env = {**cli_env, "FLASHDMD_STORAGE_ROOT": str(storage)}
    res = _flashdmd(env, "generate", "--job", "j_test", "--prompt", PROMPT, "--seed", "1", "-o",
                    str(tmp_path / "job.jpg"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert Image.open(tmp_path / "job.jpg").format == "JPEG"
    res = _flashdmd(env, "generate", "--job", "j_missing", "--prompt", PROMPT)
    assert res.returncode == 2 and "no run directory" in res.stderr


def test_generate_rejects_bad_input_with_exit_2(runs, cli_env, tmp_path):
    res = _flashdmd(cli_env, "generate", "--checkpoint", str(runs["sdxl"]), "--prompt", "x", "--steps", "3")
    assert res.returncode == 2 and "trained for [4] steps" in res.stderr and "Traceback" not in res.stderr
    res = _flashdmd(cli_env, "generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert res.returncode == 2 and "no such checkpoint" in res.stderr


def test_exported_diffusers_folder_reproduces_our_image(runs, cli_env, tmp_path):
    ours = tmp_path / "ours.png"
    res = _flashdmd(cli_env, "generate", "--checkpoint", str(runs["sdxl"]), "--prompt", PROMPT,
                    "--seed", str(SEED), "-o", str(ours))
    assert res.returncode == 0, res.stderr[-3000:]
    res = _flashdmd(cli_env, "export", str(runs["sdxl"]), "--format", "diffusers", "-o", str(tmp_path / "pipe"))
    assert res.returncode == 0, res.stderr[-3000:]
    card = json.loads((tmp_path / "pipe" / "flashdmd.json").read_text())
    assert card["pipeline_call"] == {"num_inference_steps": 4, "guidance_scale": 0.0}
    assert not list((tmp_path / "pipe").rglob("*.bin")) and not list((tmp_path / "pipe").rglob("*.pkl"))
    _user_script(tmp_path, """
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(args["dir"])
        assert type(pipe.scheduler).__name__ == "LCMScheduler"
        image = pipe(args["prompt"], num_inference_steps=4, guidance_scale=0,
                     generator=torch.Generator().manual_seed(args["seed"])).images[0]
        image.save(args["out"])
    """, {"dir": str(tmp_path / "pipe"), "prompt": PROMPT, "seed": SEED, "out": str(tmp_path / "theirs.png")},
                 cli_env)
    a = np.asarray(Image.open(ours), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "theirs.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # the same latents to 1e-4; at most a rounding step apart in uint8


def test_exported_unet_safetensors_loads_into_a_plain_unet(runs, cli_env, tmp_path):
    res = _flashdmd(cli_env, "export", str(runs["sdxl"]), "--format", "unet", "-o", str(tmp_path / "u"))
    assert res.returncode == 0, res.stderr[-3000:]
    _user_script(tmp_path, """
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file
        unet = UNet2DConditionModel.from_config(json.load(open(args["dir"] + "/config.json")))
        unet.load_state_dict(load_file(args["dir"] + "/unet.safetensors"), strict=True)
        ref = UNet2DConditionModel.from_pretrained(args["ckpt"])
        for (n, p), q in zip(unet.named_parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q), n
    """, {"dir": str(tmp_path / "u"), "ckpt": str(next(runs["sdxl"].glob("checkpoints/step-*/unet")))}, cli_env)


def test_sd3_lora_through_load_lora_weights_reproduces_our_latents(runs, cli_env, tmp_path):
    from inference.pipeline import load_pipeline

    res = _flashdmd(cli_env, "export", str(runs["sd3-lora"]), "--format", "lora", "-o", str(tmp_path / "lora"))
    assert res.returncode == 0, res.stderr[-3000:]
    card = json.loads((tmp_path / "lora" / "flashdmd.json").read_text())
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["transformer.lora_alpha"] == 2.0 and adapter["transformer.r"] == 4
    ours = load_pipeline(runs["sd3-lora"]).latents([PROMPT], [SEED]).numpy()
    np.save(tmp_path / "ours.npy", ours)
    _user_script(tmp_path, """
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
        pipe = StableDiffusion3Pipeline.from_pretrained(args["teacher"])
        pipe.load_lora_weights(args["lora"])
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, stochastic_sampling=True)
        torch.manual_seed(args["seed"])  # the pipeline does not pass its generator to scheduler.step
        lat = pipe(args["prompt"], output_type="latent", **args["call"]).images
        diff = np.abs(lat.numpy() - np.load(args["ours"])).max()
        assert diff < 1e-4, diff
    """, {"teacher": _teacher(cli_env, "sd3"), "lora": str(tmp_path / "lora"), "seed": SEED, "prompt": PROMPT,
          "call": card["pipeline_call"], "ours": str(tmp_path / "ours.npy")}, cli_env)


def test_sd3_exported_diffusers_folder_reproduces_our_latents(runs, cli_env, tmp_path):
    from inference.pipeline import load_pipeline

    res = _flashdmd(cli_env, "export", str(runs["sd3-lora"]), "--format", "diffusers", "-o", str(tmp_path / "p"))
    assert res.returncode == 0, res.stderr[-3000:]
    np.save(tmp_path / "ours.npy", load_pipeline(runs["sd3-lora"]).latents([PROMPT], [SEED]).numpy())
    call = json.loads((tmp_path / "p" / "flashdmd.json").read_text())["pipeline_call"]
    _user_script(tmp_path, """
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(args["dir"])
        assert pipe.scheduler.config.stochastic_sampling
        torch.manual_seed(args["seed"])
        lat = pipe(args["prompt"], output_type="latent", **args["call"]).images
        assert np.abs(lat.numpy() - np.load(args["ours"])).max() < 1e-4
    """, {"dir": str(tmp_path / "p"), "seed": SEED, "prompt": PROMPT, "call": call,
          "ours": str(tmp_path / "ours.npy")}, cli_env)


def test_kohya_export_of_a_trained_sdxl_lora(runs, cli_env, tmp_path):
    res = _flashdmd(cli_env, "export", str(runs["sdxl-lora"]), "--format", "lora-kohya", "-o", str(tmp_path / "k"))
    assert res.returncode == 0, res.stderr[-3000:]
    (kohya,) = (tmp_path / "k").glob("*.safetensors")
    with safe_open(str(kohya), "pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert keys and all(k.startswith("lora_unet_") for k in keys) and alphas == {2.0}
    res = _flashdmd(cli_env, "export", str(runs["sdxl"]), "--format", "lora", "-o", str(tmp_path / "x"))
    assert res.returncode == 2 and "needs a LoRA checkpoint" in res.stderr
