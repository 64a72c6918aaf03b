"""Reward models: the LRM architecture, its released checkpoint layout, VFE, the pair loss and LRM training."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.jobspec import ModelSpec
from trainer.models import load_teacher
from trainer.reward import (
    LatentRewardModel,
    PixelReward,
    contrast_scorer,
    load_lrm,
    lrm_pair_loss,
    pixel_scorer,
    save_lrm,
    visual_feature_dim,
)
from trainer.reward_train import read_pairs, train_lrm

PROMPTS = ["a handwritten digit one", "a handwritten digit two", "a handwritten digit one"]


@pytest.fixture(scope="module")
def teachers(tiny_dir):
    return {f: load_teacher(ModelSpec(teacher=str(tiny_dir(f)))) for f in ("sdxl", "sd15")}


def lrm_of(teacher, **kw) -> LatentRewardModel:
    return LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution, **kw).eval()


def test_feature_width_matches_the_released_projections():
    def unet(chans):
        return SimpleNamespace(config=SimpleNamespace(block_out_channels=chans), down_blocks=[None] * len(chans))

    assert visual_feature_dim(unet((320, 640, 1280))) == 3520  # LRM-XL: Linear(3520 -> 1280)
    assert visual_feature_dim(unet((320, 640, 1280, 1280))) == 4800  # LRM-1.5: Linear(4800 -> 768)


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_lrm_round_trips_through_the_released_layout(teachers, tmp_path, family):
    t = teachers[family]
    lrm = lrm_of(t)
    assert not lrm.trained, "an LRM built from a pipeline is labelled untrained"
    z, tt = torch.randn(3, 4, 16, 16), torch.tensor([999, 500, 1])
    with torch.no_grad():
        before = lrm.score(z, tt, PROMPTS)
    assert before.shape == (3,) and torch.isfinite(before).all()
    assert (before.abs() <= math.exp(2.6592) + 1e-4).all()  # exp(logit_scale) * cosine
    save_lrm(lrm, tmp_path / "lrm")
    encoders = ["text_encoder", "text_encoder_2"][: 2 if family == "sdxl" else 1]
    for sub in ["unet", *encoders]:
        assert (tmp_path / "lrm" / sub / "config.json").is_file()
    state = torch.load(tmp_path / "lrm" / "state_dict.pt", weights_only=True)
    assert set(state) == {"visual_projection", "logit_scale"} | ({"text_projection"} if family == "sd15" else set())
    assert state["visual_projection"]["weight"].shape == (32, 32 + 64 + 64)  # down 32, 64 + mid 64 -> text width
    assert isinstance(state["logit_scale"], float)
    # The released folders carry neither tokenizers nor our lrm_config.json: the base pipeline fills in.
    shutil.rmtree(tmp_path / "lrm" / "tokenizer")
    shutil.rmtree(tmp_path / "lrm" / "tokenizer_2", ignore_errors=True)
    (tmp_path / "lrm" / "lrm_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_lrm(tmp_path / "lrm")
    back = load_lrm(tmp_path / "lrm", base=t.pipe.config["_name_or_path"], resolution=t.resolution).eval()
    with torch.no_grad():
        torch.testing.assert_close(back.score(z, tt, PROMPTS), before, rtol=0, atol=1e-6)


def test_text_encoders_missing_from_the_folder_come_from_the_base(teachers, tmp_path):
    t = teachers["sdxl"]
    lrm = lrm_of(t)
    save_lrm(lrm, tmp_path / "lrm")
    for sub in ("text_encoder", "text_encoder_2"):  # LPO saves them only when they were trained
        shutil.rmtree(tmp_path / "lrm" / sub)
    back = load_lrm(tmp_path / "lrm", base=t.pipe).eval()
    z, tt = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(back.score(z, tt, PROMPTS[:2]), lrm.score(z, tt, PROMPTS[:2]), rtol=0, atol=1e-6)


def test_vfe_is_cfg_on_the_mid_feature_only(teachers):
    lrm = lrm_of(teachers["sdxl"])
    z, tt = torch.randn(2, 4, 16, 16), torch.tensor([999, 300])
    with torch.no_grad():
        text, unc = lrm.encode(PROMPTS[:2]), lrm.encode([""])
        cond_only = lrm.visual_features(z, tt, text, None)
        lrm.vfe_scale = 1.0
        f1 = lrm.visual_features(z, tt, text, unc)
        lrm.vfe_scale = 7.5
        f7 = lrm.visual_features(z, tt, text, unc)
        lrm.vfe_scale = 0.0
        f0 = lrm.visual_features(z, tt, text, unc)
    down = 32 + 64
    torch.testing.assert_close(f7[:, :down], cond_only[:, :down])  # down stages: the conditional branch
    torch.testing.assert_close(f1, cond_only, atol=1e-5, rtol=0)  # g = 1 is the conditional feature
    m_c, m_u = cond_only[:, down:], f0[:, down:]  # g = 0 is the unconditional mid feature
    torch.testing.assert_close(f7[:, down:], m_u + 7.5 * (m_c - m_u), atol=1e-4, rtol=1e-5)


def test_lrm_scores_depend_on_the_timestep_and_the_prompt(teachers):
    lrm = lrm_of(teachers["sdxl"])
    z = torch.randn(1, 4, 16, 16).expand(3, -1, -1, -1)
    with torch.no_grad():
        by_t = lrm.score(z, torch.tensor([999, 500, 1]), [PROMPTS[0]] * 3)
        by_p = lrm.score(z, torch.tensor([500, 500, 500]), PROMPTS)
    assert by_t.unique().numel() == 3, "noise-aware: the UNet sees t"
    # Rows 0 and 2 share z, t and prompt; a batched CPU kernel may still differ in the last bits between rows.
    assert by_p[0].item() == pytest.approx(by_p[2].item(), abs=1e-5)
    assert abs(by_p[0].item() - by_p[1].item()) > 1e-3, "the score depends on the prompt"


def test_pair_loss_by_hand():
    loss, logs = lrm_pair_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6) and logs["lrm/pair_acc"] == 1.0
    loss, _ = lrm_pair_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0.5]))  # tie: soft labels
    assert loss.item() == pytest.approx(0.5 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(2.0))), abs=1e-6)


def test_pixel_reward_denoises_decodes_and_scores():
    seen = {}

    def denoise(z, t, prompts):
        seen["t"], seen["prompts"] = t.tolist(), list(prompts)
        return z * 0

    r = PixelReward(lambda x: x.repeat(1, 3, 1, 1)[:, :3] + 1, contrast_scorer(), denoise)
    z = torch.randn(2, 1, 4, 4)
    assert r.score(z, torch.tensor(7), ["x", "y"]).tolist() == [0.0, 0.0] and seen["t"] == [7, 7]
    s = PixelReward(lambda x: x, pixel_scorer("contrast")).score(z, torch.tensor([1, 2]), ["x", "y"])
    torch.testing.assert_close(s, z.flatten(1).std(1))
    with pytest.raises(KeyError, match="unknown pixel scorer"):
        pixel_scorer("os:system")


def _png(path, value: float) -> None:
    Image.fromarray(np.full((32, 32, 3), int(value * 255), dtype=np.uint8)).save(path)


def test_lrm_training_learns_a_preference(teachers, tmp_path):
    # Pairs: a bright image beats a dark one. The JSONL is read as the command reads it.
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(4):
        _png(tmp_path / "img" / f"w{i}.png", 0.8 + 0.05 * i)
        _png(tmp_path / "img" / f"l{i}.png", 0.1 + 0.05 * i)
        rows.append({"prompt": PROMPTS[i % 2], "winner": f"img/w{i}.png", "loser": f"img/l{i}.png"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_pairs(tmp_path / "pairs.jsonl")
    assert len(pairs) == 4 and pairs[0].winner.is_file() and pairs[0].label == 1.0
    t = teachers["sdxl"]
    lrm = lrm_of(t)
    from trainer.data import to_tensor

    def enc(p):
        with Image.open(p) as im:
            return t.encode_images(to_tensor(im, 32)[None])

    lat_w = torch.cat([enc(p.winner) for p in pairs])
    lat_l = torch.cat([enc(p.loser) for p in pairs])
    batch = {"prompt": [p.prompt for p in pairs], "winner": lat_w, "loser": lat_l, "label": torch.ones(4)}
    hist = train_lrm(lrm, iter([batch] * 10), t.param, steps=10, lr=5e-4, timesteps=(1, 201))
    assert lrm.trained and not lrm.training
    losses = [h["loss/lrm"] for h in hist]
    assert np.mean(losses[5:]) < losses[0] and all(math.isfinite(v) for v in losses)
    with torch.no_grad():
        sw = lrm.score(lat_w, torch.ones(4, dtype=torch.long), batch["prompt"])
        sl = lrm.score(lat_l, torch.ones(4, dtype=torch.long), batch["prompt"])
    assert (sw > sl).all()


def test_toy_reward_pairs_and_a_short_training_run(tiny_dir, tmp_path):
    from trainer.toy.reward import LOSER_KINDS, degrade, make_pairs, parse_timesteps, split, train_toy_reward

    tr, te = split(100, seed=0)
    assert len(tr) == 80 and len(te) == 20 and not set(tr.tolist()) & set(te.tolist())
    g = torch.Generator().manual_seed(0)
    img = torch.full((3, 32, 32), -1.0)
    img[:, 8:24, 12:20] = 1.0
    for kind in ("blur", "noise", "erase"):
        worse = degrade(img, kind, g)
        assert worse.shape == img.shape and not torch.equal(worse, img) and worse.abs().max() <= 1
    labels = torch.tensor([0, 1, 2, 3] * 5)
    images = torch.stack([torch.full((3, 32, 32), float(c) / 3) for c in labels])
    pairs = make_pairs(images, labels, 40, g)
    assert set(pairs["kind"]) == set(LOSER_KINDS) and pairs["winner"].shape == (40, 3, 32, 32)
    for p, w, lo, k in zip(pairs["prompt"], pairs["winner"], pairs["loser"], pairs["kind"], strict=True):
        c = round(float(w[0, 0, 0]) * 3)
        assert p.endswith(["zero", "one", "two", "three"][c])
        if k == "wrong_class":
            assert round(float(lo[0, 0, 0]) * 3) != c

    report = train_toy_reward(str(tiny_dir("sdxl")), tmp_path / "lrm", steps=2, batch_size=4, train_pairs=8,
                              test_pairs=8, log_every=1, timesteps=parse_timesteps("lrm+999"))
    assert set(report["held_out_accuracy_after"]) >= {"acc/t1", "acc/t999", "acc/t499/blur"}
    assert report["train_timesteps"][-2:] == [951, 999]
    assert (tmp_path / "lrm" / "state_dict.pt").is_file() and (tmp_path / "lrm" / "report.json").is_file()
    from trainer.reward import load_lrm

    assert load_lrm(tmp_path / "lrm").trained


def test_toy_reward_timesteps_option():
    from trainer.reward_train import LRM_TIMESTEPS
    from trainer.toy.reward import parse_timesteps

    assert parse_timesteps("lrm") == LRM_TIMESTEPS
    assert parse_timesteps("lrm+999") == (*LRM_TIMESTEPS, 999)
    assert parse_timesteps("999,749") == (749, 999)
    for bad in ("", "1000", "lrm+-1"):
        with pytest.raises(ValueError):
            parse_timesteps(bad)
