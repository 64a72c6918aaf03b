"""`flashdmd export --push-to-hub` against a local stand-in hub (tests/e2e/hubkit.py): no network."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hubkit import LocalHub
from huggingface_hub import ModelCard, constants

from inference.hub_push import PushError, push_folder

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_folder_creates_the_repo_and_commits_every_file(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = tmp_path / "export"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 40)
    (folder / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# card\n")
    (folder / "empty.txt").write_bytes(b"")
    with LocalHub() as hub:
        pushed = push_folder(folder, "me/flash", private=True, token="hf_test", endpoint=hub.url)
    assert hub.state.unknown == []
    assert hub.state.repos["me/flash"]["is_private"] is True
    assert hub.state.files["me/flash"] == _tree(folder)
    assert pushed.files == 3 and pushed.repo_url == f"{hub.url}/me/flash" and "/me/flash/commit/" in pushed.commit_url
    assert all(a == "Bearer hf_test" for a in hub.state.auth)
    assert hub.state.commits[0]["summary"] == "flashdmd export: export"


def test_an_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(PushError, match="--push-to-hub me/flash: could not create the repo"):
        push_folder(tmp_path, "me/flash", token="hf_test", endpoint=f"http://127.0.0.1:{port}")


def test_cli_exports_a_trained_run_and_pushes_it_with_card_and_samples(run_cli, cli_env, tmp_path):
    run = tmp_path / "run"
    prompts = ["a handwritten digit two", "a handwritten digit eight"]
    res = run_cli("presets/tiny-sdxl.yaml", "--run-dir", str(run), "--set", "train.max_steps=1",
                  "--set", "train.checkpoint_every=1", "--set", f"train.validation.prompts={json.dumps(prompts)}",
                  "--set", "train.validation.seeds=[3, 4]")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "pipe"
    env = {k: v for k, v in cli_env.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    with LocalHub() as hub:
        env["HF_ENDPOINT"] = hub.url
        cmd = [sys.executable, "-c", "from api.cli import main; main()", "export", str(run), "--format", "diffusers",
               "-o", str(out), "--push-to-hub", "me/tiny-flash", "--token", "hf_test"]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pushed" in res.stdout and f"{hub.url}/me/tiny-flash" in res.stdout
    assert hub.state.unknown == [] and hub.state.repos["me/tiny-flash"]["is_private"] is False
    arrived = hub.state.files["me/tiny-flash"]
    assert arrived == _tree(out)  # exactly the export folder, card and samples included
    assert "model_index.json" in arrived and "unet/diffusion_pytorch_model.safetensors" in arrived
    assert arrived["samples/step-00000001.png"] == (run / "samples" / "step-00000001.png").read_bytes()
    card = ModelCard(arrived["README.md"].decode())
    assert card.data.library_name == "diffusers" and "flashdmd" in card.data.tags
    assert "A 4-step text-to-image generator" in card.text and "training steps: 1" in card.text
    assert "'a handwritten digit two': seeds [3, 4]" in card.text and "## Training spec" in card.text
    # Without --push-to-hub, the push-only options are refused; a bad --eval or repo id fails before exporting.
    res = subprocess.run([*cmd[:3], "export", str(run), "--format", "unet", "--private"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "only apply with --push-to-hub" in res.stderr
    (tmp_path / "bad.json").write_text("{}")
    for extra, words in ((["--push-to-hub", "me/x", "--eval", str(tmp_path / "bad.json")], "not an eval.json"),
                         (["--push-to-hub", "me/x@main"], "expected a repo id org/name")):
        res = subprocess.run([*cmd[:3], "export", str(run), "--format", "unet", "-o", str(tmp_path / "unet"), *extra],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and words in res.stderr and not (tmp_path / "unet").exists()
