"""The inference library: sampler parity with diffusers, checkpoint loading, the pipeline cache, images."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from inference.cache import PipelineCache
from inference.checkpoint import CheckpointError, CheckpointInfo, resolve_checkpoint_dir
from inference.export import few_step_scheduler, lcm_timesteps, sampler_call
from inference.images import MEDIA_TYPES, encode_image
from inference.lora import read_lora
from inference.pipeline import estimate_bytes, load_pipeline
from inference.testing import make_checkpoint

SEEDS = [11, 12]
PROMPTS = ["a handwritten digit seven", "a red cat"]


@pytest.fixture(scope="module")
def sdxl_ckpt(tiny_dir, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sdxl-run"), "sdxl", tiny_dir("sdxl"))


@pytest.fixture(scope="module")
def sd3_lora_ckpt(tiny_dir, tmp_path_factory):
    # alpha != rank: diffusers would assume alpha = rank without the adapter metadata we attach.
    return make_checkpoint(tmp_path_factory.mktemp("sd3-run"), "sd3", tiny_dir("sd3"), lora={"rank": 4, "alpha": 2.0})


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_ckpt):
    return load_pipeline(sdxl_ckpt)


@pytest.fixture(scope="module")
def sd3_pipe(sd3_lora_ckpt):
    return load_pipeline(sd3_lora_ckpt)


def _diffusers_pipe(family: str, teacher, **components):  # noqa: ANN001, ANN202
    from trainer.models import pipeline_class

    pipe = pipeline_class(family).from_pretrained(teacher, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_sampler_matches_diffusers_lcm_pipeline(sdxl_pipe, sdxl_ckpt, tiny_dir):
    from diffusers import UNet2DConditionModel

    ours = sdxl_pipe.latents(PROMPTS, SEEDS)
    pipe = _diffusers_pipe("sdxl", tiny_dir("sdxl"), unet=UNet2DConditionModel.from_pretrained(sdxl_ckpt / "unet"))
    info = CheckpointInfo.load(sdxl_ckpt)
    pipe.scheduler = few_step_scheduler(info, dict(pipe.scheduler.config))
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    ref = pipe(PROMPTS, **sampler_call(info), output_type="latent", generator=gens).images
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert (ours - ref).abs().max().item() < 1e-4
    teacher = _diffusers_pipe("sdxl", tiny_dir("sdxl"))
    teacher.scheduler = pipe.scheduler
    base = teacher(PROMPTS, **sampler_call(info), output_type="latent",
                   generator=[torch.Generator().manual_seed(s) for s in SEEDS]).images
    assert (base - ref).abs().max().item() > 1e-2, "the checkpoint's UNet must differ from the teacher's"


def test_sd3_lora_sampler_matches_load_lora_weights_with_stochastic_flow_scheduler(sd3_pipe, sd3_lora_ckpt, tiny_dir,
                                                                                   tmp_path):
    from inference.export import export_checkpoint

    info = CheckpointInfo.load(sd3_lora_ckpt)
    ours = sd3_pipe.latents(PROMPTS[:1], SEEDS[:1])
    lora_dir = export_checkpoint(info, "lora", tmp_path / "lora")
    pipe = _diffusers_pipe("sd3", tiny_dir("sd3"))
    pipe.scheduler = few_step_scheduler(info, dict(pipe.scheduler.config))
    torch.manual_seed(SEEDS[0])  # the SD3 pipeline does not hand its generator to scheduler.step
    base = pipe(PROMPTS[:1], **sampler_call(info), output_type="latent").images
    pipe.load_lora_weights(lora_dir)
    torch.manual_seed(SEEDS[0])
    ref = pipe(PROMPTS[:1], **sampler_call(info), output_type="latent").images
    assert (ours - ref).abs().max().item() < 1e-4
    assert (base - ref).abs().max().item() > 1e-2, "the LoRA must change the output"


def test_lora_alpha_comes_from_meta_when_the_file_lacks_it(sd3_lora_ckpt):
    state, metadata = read_lora(CheckpointInfo.load(sd3_lora_ckpt))
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 2.0
    assert all(k.startswith("transformer.") for k in state)


def test_generate_is_deterministic_per_seed_and_batch_independent(sdxl_pipe):
    a = sdxl_pipe.generate(PROMPTS, SEEDS)
    b = sdxl_pipe.generate(PROMPTS[1:], SEEDS[1:])
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a[1], b[0]), "an image depends on its own seed only, not on its batch"
    assert not np.array_equal(a[0], sdxl_pipe.generate(PROMPTS[:1], [SEEDS[0] + 100])[0])


def test_size_steps_and_guidance_options(sdxl_pipe):
    img = sdxl_pipe.generate(["a cat"], [0], width=48, height=16)
    assert img.shape == (1, 16, 48, 3)
    with pytest.raises(CheckpointError) as err:
        sdxl_pipe.generate(["a cat"], [0], steps=3)
    assert err.value.field == "steps" and "[4]" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        sdxl_pipe.generate(["a cat"], [0], width=33)
    assert err.value.field == "width"
    cfg = sdxl_pipe.generate(["a cat"], [0], guidance=3.0, negative_prompt="blurry")
    assert not np.array_equal(cfg, sdxl_pipe.generate(["a cat"], [0]))


def test_sd3_size_is_bounded_by_the_position_table(sd3_pipe):
    geo = sd3_pipe.geometry
    assert geo.multiple == 4 and geo.max_side == 64  # tiny SD3: VAE 2 x patch 2, 16-patch table
    with pytest.raises(CheckpointError, match="outside"):
        sd3_pipe.size(128, 32)


def test_checkpoint_info_validation(sdxl_ckpt, tmp_path):
    run = sdxl_ckpt.parent.parent
    assert resolve_checkpoint_dir(run) == sdxl_ckpt
    info = CheckpointInfo.load(run)
    assert info.num_steps == 4 and info.allowed_steps() == [4] and info.export_formats() == ["diffusers", "unet"]
    assert info.id == f"{run.name}/step-00000007"
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        CheckpointInfo.load(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text(json.dumps({"step": 1, "family": "sdxl"}))
    with pytest.raises(CheckpointError, match="lacks"):
        CheckpointInfo.load(bad)
    meta = json.loads((sdxl_ckpt / "meta.json").read_text())
    extra = CheckpointInfo.from_meta(sdxl_ckpt, {**meta, "step_sets": {"2": [999, 499]}})
    assert extra.allowed_steps() == [2, 4] and extra.timesteps_for(2) == [999, 499]


def test_lcm_default_schedule_is_the_trained_list():
    from diffusers import LCMScheduler

    for k in (1, 2, 4, 8):
        sched = LCMScheduler(original_inference_steps=k)
        sched.set_timesteps(k)
        assert sched.timesteps.tolist() == lcm_timesteps(k)
    assert lcm_timesteps(4) == [999, 749, 499, 249]
    assert lcm_timesteps(8) == [999, 874, 749, 624, 499, 374, 249, 124]


def test_lora_pipeline_is_fused_and_memory_estimate_is_close(sd3_pipe, sd3_lora_ckpt):
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in sd3_pipe.net.modules()), "LoRA layers should be merged"
    est = estimate_bytes(CheckpointInfo.load(sd3_lora_ckpt))
    assert 0.8 < est / sd3_pipe.nbytes < 1.25


class _Big:
    def __init__(self, key: str, nbytes: int) -> None:
        self.key, self.nbytes = key, nbytes


def test_cache_is_lru_within_budget_and_loads_once_under_concurrency():
    loads: list[str] = []
    lock = threading.Lock()

    def load(key):  # noqa: ANN001, ANN202
        time.sleep(0.05)
        with lock:
            loads.append(key)
        return _Big(key, 40)

    cache = PipelineCache(100, load, lambda v: v.nbytes)
    threads = [threading.Thread(target=cache.get, args=("a",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["a"] and cache.stats.hits == 7
    cache.get("b")
    cache.get("a")  # a becomes most recent
    cache.get("c")  # 3 x 40 > 100: evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache and cache.used_bytes == 80
    assert cache.stats.evictions == 1


def test_cache_estimate_makes_room_before_loading():
    in_cache_during_load: list[bool] = []
    cache: PipelineCache[_Big] = PipelineCache(100, lambda k: _Big(str(k), 60), lambda v: v.nbytes,
                                               estimate=lambda k: 60)
    cache.get("a")

    def load(key):  # noqa: ANN001, ANN202
        in_cache_during_load.append("a" in cache)
        return _Big(str(key), 60)

    cache._load = load
    cache.get("b")
    assert in_cache_during_load == [False]


def test_cache_failed_load_is_not_cached():
    calls = []

    def load(key):  # noqa: ANN001, ANN202
        calls.append(key)
        raise OSError("disk gone")

    cache: PipelineCache[_Big] = PipelineCache(100, load, lambda v: v.nbytes)
    for _ in range(2):
        with pytest.raises(OSError):
            cache.get("x")
    assert calls == ["x", "x"] and len(cache) == 0


@pytest.mark.parametrize("fmt", sorted(MEDIA_TYPES))
def test_encode_image_formats_are_valid_and_deterministic(fmt):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    data = encode_image(img, fmt)
    assert data == encode_image(img.copy(), fmt)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt] and decoded.size == (40, 24)
    if fmt == "png":
        assert np.array_equal(np.asarray(decoded), img)
    with pytest.raises(ValueError):
        encode_image(img.astype(np.float32), fmt)
