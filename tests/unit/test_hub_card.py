"""The model card and the staging of `flashdmd export --push-to-hub` (no network: the upload is tests/e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from inference.checkpoint import CheckpointInfo
from inference.hub_card import gather, model_card, stage_hub_folder
from inference.hub_push import PushError, check_repo_id

SPEC = {"kind": "distill", "model": {"teacher": "stabilityai/stable-diffusion-xl-base-1.0"},
        "train": {"max_steps": 8, "validation": {"prompts": ["a red cat"], "seeds": [1, 2]}}}


def make_run(root: Path, *, teacher: str = "stabilityai/stable-diffusion-xl-base-1.0", lora: bool = False) -> Path:
    """A run directory in the layout the trainer writes: config.json, checkpoints/step-N/meta.json, samples/."""
    ck = root / "checkpoints" / "step-00000008"
    (ck / ("lora" if lora else "unet")).mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({
        "step": 8, "family": "sdxl", "teacher": teacher, "resolution": 1024, "timesteps": [999, 749, 499, 249],
        "generator": "lora" if lora else "unet", "lora": {"rank": 4, "alpha": 2} if lora else None}))
    (root / "config.json").write_text(json.dumps(SPEC))
    samples = root / "samples"
    samples.mkdir()
    for step, color in ((4, "red"), (8, "blue"), (12, "green")):  # 12: after the checkpoint, not its samples
        Image.new("RGB", (8, 4), color).save(samples / f"step-{step:08d}.png")
    Image.new("RGB", (16, 4), "blue").save(samples / "step-00000008-64x32.png")
    (samples / "step-00000008.json").write_text(json.dumps({"cells": [
        {"prompt": "a red cat", "seed": 1, "row": 0, "col": 0}, {"prompt": "a red cat", "seed": 2, "row": 0, "col": 1}]}))
    return ck


def write_eval(path: Path, ck: Path) -> Path:
    """eval.json as inference/evaluate.py writes it: one row per scored checkpoint."""
    rows = [{"checkpoint": str(ck), "step": 8, "images": 100, "seconds": 1.0,
             "scores": {"clip": 0.3125, "clip_std": 0.01, "fid": 12.5}},
            {"checkpoint": str(ck.parent / "step-00000004"), "step": 4, "images": 100, "seconds": 1.0,
             "scores": {"clip": 0.25, "fid": 30.0}}]
    path.write_text(json.dumps({"spec": {}, "results": rows}))
    return path


def test_card_metadata_and_body(tmp_path):
    ck = make_run(tmp_path / "run")
    info = CheckpointInfo.load(ck)
    inputs = gather(info, "diffusers", write_eval(tmp_path / "eval.json", ck))
    assert [p.name for p in inputs.samples] == ["step-00000008.png", "step-00000008-64x32.png"]
    text = model_card(inputs, "me/flash-sdxl")
    card = ModelCard(text)
    assert card.data.base_model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"flashdmd", "flash-dmd", "stable-diffusion-xl", "text-to-image"} <= set(card.data.tags)
    assert "lora" not in card.data.tags
    body = card.text
    assert "A 4-step text-to-image generator" in body and "Flash-DMD: distribution matching" in body
    assert "sampling steps: **4**, timesteps [999, 749, 499, 249]" in body and "training steps: 8" in body
    assert 'DiffusionPipeline.from_pretrained("me/flash-sdxl")' in body and "num_inference_steps=4" in body
    # Only this checkpoint's evaluation row; the _std columns stay out of the table.
    assert "| step | images | clip | fid |" in body and "| 8 | 100 | 0.3125 | 12.5 |" in body
    assert "| 4 |" not in body
    assert "![step-00000008.png](samples/step-00000008.png)" in body and "'a red cat': seeds [1, 2]" in body
    spec_yaml = body.split("## Training spec")[1].split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(spec_yaml) == SPEC


def test_lora_card_and_local_teacher(tmp_path):
    ck = make_run(tmp_path / "run", teacher=str(tmp_path / "my-teacher"), lora=True)
    card = ModelCard(model_card(gather(CheckpointInfo.load(ck), "lora"), "me/flash-lora"))
    assert card.data.base_model is None  # a local folder is not a hub model to link
    assert str(tmp_path / "my-teacher") in card.text and "lora" in card.data.tags
    assert 'pipe.load_lora_weights("me/flash-lora")' in card.text
    assert "## Evaluation" not in card.text  # no eval.json anywhere
    assert "Flash-DMD" in card.text and "DMD2" not in card.text and "joint RL" not in card.text
    (ck.parent.parent / "config.json").write_text(json.dumps({"kind": "rl", "distill": {"mode": "dmd2"}}))
    text = ModelCard(model_card(gather(CheckpointInfo.load(ck), "lora"), "me/flash-lora")).text
    assert "with DMD2 (flashdmd's baseline mode" in text and "then fine-tuned with joint RL" in text


def test_run_eval_json_is_used_by_default_and_a_bad_one_is_refused(tmp_path):
    ck = make_run(tmp_path / "run")
    write_eval(tmp_path / "run" / "eval.json", ck)
    assert [r["step"] for r in gather(CheckpointInfo.load(ck), "unet").evaluation] == [8]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an eval.json"):
        gather(CheckpointInfo.load(ck), "unet", tmp_path / "bad.json")


def test_stage_writes_the_card_and_copies_the_samples(tmp_path):
    ck = make_run(tmp_path / "run")
    out = tmp_path / "export"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    stage_hub_folder(out, gather(CheckpointInfo.load(ck), "diffusers"), "me/x")
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000008-64x32.png", "step-00000008.png"]
    assert (out / "samples" / "step-00000008.png").read_bytes() == (
        tmp_path / "run" / "samples" / "step-00000008.png").read_bytes()
    assert ModelCard.load(out / "README.md").data.library_name == "diffusers"


@pytest.mark.parametrize("repo", ["name", "org/name/file.pth", "org/name@main", "../x/y", "org/.."])
def test_push_target_must_be_a_repo_id(repo):
    with pytest.raises(PushError, match="expected a repo id org/name"):
        check_repo_id(repo)
