"""The text-embedding cache: cached conditioning equals fresh encoding; another teacher's cache is refused."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from trainer.distill import Distiller
from trainer.errors import InputError
from trainer.models import load_teacher
from trainer.textcache import TextCache, build_text_cache, dataset_captions, text_encoder_key, use_text_cache

PROMPTS = ["a handwritten digit seven", "a handwritten digit one", "a photo of a cat"]


def _equal(a, b) -> bool:
    # The cache encodes its captions in other batches than the test does (with the empty CFG prompt), and a
    # CPU matmul's blocking depends on the batch size: the pooled projection differs in the last bits (3.6e-7
    # seen on transformers 5.24). A caption mapped to the wrong row would differ by O(1).
    return all((x is None and y is None) or torch.allclose(x, y, rtol=1e-5, atol=1e-6)
               for x, y in zip((a.embeds, a.pooled, a.time_ids), (b.embeds, b.pooled, b.time_ids), strict=True))


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_cached_conditioning_equals_fresh_encoding(make_cfg, tmp_path, family):
    teacher = load_teacher(make_cfg(family).model)
    fresh, fresh_uncond = teacher.encode(PROMPTS), teacher.uncond(2)
    cache = build_text_cache(teacher, PROMPTS, tmp_path / "cache")
    assert len(cache) == len(PROMPTS) + 1, "the captions and the empty (CFG) prompt"
    use_text_cache(teacher, cache)

    def refuse(*_a, **_k):
        raise AssertionError("a text encoder ran although the cache holds the caption")

    hooks = [m.register_forward_pre_hook(refuse) for m in teacher.text_encoders()]
    assert _equal(teacher.encode(PROMPTS), fresh)
    assert _equal(teacher.uncond(2), fresh_uncond)
    for h in hooks:
        h.remove()
    assert all(p.device.type == "cpu" for m in teacher.text_encoders() for p in m.parameters())
    # A caption the cache lacks is encoded on the CPU and gives the same result as before.
    miss = teacher.encode(["a caption that was never cached"])
    teacher2 = load_teacher(make_cfg(family).model)
    assert _equal(miss, teacher2.encode(["a caption that was never cached"]))
    assert teacher.text_cache_misses == 1


def test_a_cache_from_another_teacher_is_refused(make_cfg, tmp_path):
    teacher = load_teacher(make_cfg("sdxl").model)
    build_text_cache(teacher, PROMPTS, tmp_path / "c")
    tuned = load_teacher(make_cfg("sdxl").model)  # same architecture and configs, one weight changed
    with torch.no_grad():
        tuned.pipe.text_encoder_2.text_model.final_layer_norm.weight.add_(0.01)
    assert text_encoder_key(tuned) != text_encoder_key(teacher)
    with pytest.raises(InputError, match="memory.cache_dir: .* made for another model"):
        build_text_cache(tuned, PROMPTS, tmp_path / "c")
    with pytest.raises(InputError, match="another model"):
        build_text_cache(load_teacher(make_cfg("sd15").model), PROMPTS, tmp_path / "c")


def test_the_cache_grows_by_new_shards_and_survives_reopening(make_cfg, tmp_path):
    teacher = load_teacher(make_cfg("sdxl").model)
    build_text_cache(teacher, PROMPTS[:2], tmp_path / "c")
    first = (tmp_path / "c" / "text" / "shard-00000.safetensors").read_bytes()
    cache = build_text_cache(teacher, PROMPTS, tmp_path / "c")  # one new caption: one new shard
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["format"] == "flashdmd-cache" and manifest["model"]["key"] == text_encoder_key(teacher)
    assert manifest["text"]["shards"] == {"text/shard-00000.safetensors": 3, "text/shard-00001.safetensors": 1}
    assert (tmp_path / "c" / "text" / "shard-00000.safetensors").read_bytes() == first
    reopened = TextCache(tmp_path / "c", text_encoder_key(teacher))
    got = reopened.get(PROMPTS)
    assert got is not None and torch.equal(got["embeds"], cache.get(PROMPTS)["embeds"])
    assert reopened.get(["not cached"]) is None


def test_distiller_trains_from_the_cache(make_cfg, batch, tmp_path):
    from trainer.data import DigitsDataset

    cfg = make_cfg("sdxl", distill__gan_weight=0.0)  # the GAN path does not read text: keep the test fast
    teacher = load_teacher(cfg.model)
    captions = dataset_captions(DigitsDataset(32))
    assert len(captions) == 1797 and "a handwritten digit zero" in captions
    use_text_cache(teacher, build_text_cache(teacher, captions, tmp_path / "c"))
    d = Distiller.for_job(cfg, teacher, Accelerator(cpu=True))
    logs = d.step(batch(2), 0)
    assert teacher.text_cache_misses == 0
    assert all(torch.isfinite(torch.tensor(v)) for k, v in logs.items() if k.startswith("loss/"))


def test_train_builds_the_cache_in_the_run_dir(make_cfg, tmp_path):
    from trainer.loop import train
    from trainer.sink import JsonlSink

    cfg = make_cfg("sdxl", memory__text_cache=True, train__max_steps=1, train__checkpoint_every=100,
                   train__sample_every=100, train__num_samples=1, distill__gan_weight=0.0)  # GAN: not under test
    run = tmp_path / "run"
    assert train(cfg, JsonlSink(run), run_dir=run) == 1
    manifest = json.loads((run / "cache" / "manifest.json").read_text())
    assert len(manifest["text"]["entries"]) == 11, "ten digit captions and the empty prompt"
