"""Tiny random-weight pipelines: local CLIP tokenizer, build/save/load with stock diffusers, caching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainer import tiny

PROMPT = "a photo of a cat next to a handwritten digit seven"


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return tiny.build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenizer_files_in_clip_format(tmp_path: Path) -> None:
    tok = tiny.build_clip_tokenizer(tmp_path, vocab_size=1000)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert len(vocab) == len(tok) <= 1000
    # 256 byte symbols, the same with </w>, one token per merge, BOS and EOS last (EOS has the top id).
    assert len(vocab) == 512 + (len(merges) - 1) + 2
    assert vocab["a"] == vocab["a</w>"] - 256
    assert (vocab[tiny.BOS], vocab[tiny.EOS]) == (len(vocab) - 2, len(vocab) - 1)
    first_a, first_b = merges[1].split(" ")
    assert vocab[first_a + first_b] == 512


def test_tokenizer_encodes_pads_and_round_trips(clip_tokenizer, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    ids = clip_tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == clip_tokenizer.bos_token_id
    n = ids.index(clip_tokenizer.eos_token_id)
    assert ids[n:] == [clip_tokenizer.eos_token_id] * (77 - n)  # EOS, then EOS padding
    assert clip_tokenizer.pad_token == tiny.EOS and clip_tokenizer.model_max_length == 77

    # Merges work: learned words are single tokens, far fewer than their bytes.
    body = ids[1:n]
    assert len(body) < len(PROMPT.replace(" ", "")) // 2
    assert clip_tokenizer.tokenize("handwritten") == ["handwritten</w>"]
    assert clip_tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    # Unknown words still encode, byte by byte at worst.
    assert clip_tokenizer.decode(clip_tokenizer("zyxq").input_ids, skip_special_tokens=True) == "zyxq"

    clip_tokenizer.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again(PROMPT, padding="max_length", max_length=77).input_ids == ids
    assert again.model_max_length == 77 and again.pad_token_id == clip_tokenizer.pad_token_id


def test_tokenizer_deterministic(tmp_path: Path) -> None:
    tiny._clip_vocab.cache_clear()  # relearn the merges rather than reuse the cached ones
    tiny.build_clip_tokenizer(tmp_path / "a")
    tiny._clip_vocab.cache_clear()
    tiny.build_clip_tokenizer(tmp_path / "b")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _denoiser_weights(folder: Path) -> dict[str, torch.Tensor]:
    sub = "transformer" if (folder / "transformer").is_dir() else "unet"
    (file,) = (folder / sub).glob("*.safetensors")
    return load_file(file)


@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd3"])
def test_build_load_generate(family: str, tmp_path: Path) -> None:
    out = tiny.build_tiny_pipeline(family, tmp_path / "a", seed=0)
    assert out == tmp_path / "a"
    files = [p.name for p in out.rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not [f for f in files if f.endswith((".bin", ".pkl", ".pt", ".ckpt"))]

    pipe = tiny.pipeline_class(family).from_pretrained(out)  # the stock loader, no extra kwargs
    assert type(pipe).__name__ == tiny._PIPELINES[family]
    assert pipe.vae.config.latent_channels == 4
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all()

    # Same seed, same weights; another seed, other weights.
    same = _denoiser_weights(tiny.build_tiny_pipeline(family, tmp_path / "b", seed=0))
    other = _denoiser_weights(tiny.build_tiny_pipeline(family, tmp_path / "c", seed=1))
    first = _denoiser_weights(out)
    key = sorted(first)[0]
    assert torch.equal(first[key], same[key])
    assert not torch.equal(first[key], other[key])


def test_build_leaves_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny_pipeline("sd15", tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_sd3_without_t5(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    out = tiny.build_tiny_pipeline("sd3", tmp_path, t5=False)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_tiny_pipeline_dir_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, process_env) -> None:
    built: list[str] = []
    real_build = tiny.build_tiny_pipeline

    def counting_build(family, out_dir, seed=0, **kw):
        built.append(family)
        return real_build(family, out_dir, seed, **kw)

    monkeypatch.setattr(tiny, "build_tiny_pipeline", counting_build)
    first = tiny.tiny_pipeline_dir("sd15", cache_root=tmp_path)
    assert first == tmp_path / "tiny" / "sd15"
    assert (first / "model_index.json").is_file()
    mtime = (first / "model_index.json").stat().st_mtime_ns
    assert tiny.tiny_pipeline_dir("sd15", cache_root=tmp_path) == first
    assert built == ["sd15"]
    assert (first / "model_index.json").stat().st_mtime_ns == mtime
    # No temp folders left behind next to the cache entry.
    assert sorted(os.listdir(tmp_path / "tiny")) == ["sd15"]

    # $FLASHDMD_CACHE, as the process entry installs it, is the default root.
    process_env.setenv("FLASHDMD_CACHE", str(tmp_path))
    assert tiny.tiny_pipeline_dir("sd15") == first
    assert built == ["sd15"]

    with pytest.raises(ValueError):
        tiny.tiny_pipeline_dir("flux", cache_root=tmp_path)


def test_tiny_pipeline_dir_loser_discards_its_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate a concurrent builder that wins the race while this caller is still building.
    real_build = tiny.build_tiny_pipeline

    def racing_build(family, out_dir, seed=0, **kw):
        real_build(family, tmp_path / "tiny" / family, seed, **kw)  # the winner's complete folder
        return real_build(family, out_dir, seed, **kw)

    monkeypatch.setattr(tiny, "build_tiny_pipeline", racing_build)
    target = tiny.tiny_pipeline_dir("sd15", cache_root=tmp_path)
    assert (target / "model_index.json").is_file()
    assert sorted(os.listdir(tmp_path / "tiny")) == ["sd15"]
