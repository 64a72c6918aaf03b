"""Serving options (inference/serving.py): each option's output against the plain pipeline, the tiny VAE,
serving.json through export and load, the LRU budget on cuda, and settings parsing with clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inference.checkpoint import CheckpointInfo
from inference.export import export_checkpoint
from inference.pipeline import load_pipeline
from inference.serving import SERVING_FILE, ServingError, ServingOptions, cache_budget_bytes, warm_up
from inference.testing import make_checkpoint

PROMPTS = ["a handwritten digit seven", "a red cat"]
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def ckpt(tiny_dir, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve-run"), "sdxl", tiny_dir("sdxl"))


@pytest.fixture(scope="module")
def plain(ckpt):
    pipe = load_pipeline(ckpt)
    return pipe, pipe.decode(pipe.latents(PROMPTS, SEEDS))


def _tiny_vae(folder, blocks: int = 2):  # noqa: ANN001, ANN202
    """A random AutoencoderTiny saved as a local folder; `blocks` decoder blocks upsample 2**(blocks-1) times."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(8,) * blocks, decoder_block_out_channels=(8,) * blocks,
                          num_encoder_blocks=(1,) * blocks, num_decoder_blocks=(1,) * blocks, latent_channels=4)
    vae.save_pretrained(folder)
    return folder


def test_fused_qkv_matches_the_plain_pipeline(ckpt, plain):
    _, ref = plain
    pipe = load_pipeline(ckpt, options=ServingOptions(fuse_qkv=True, channels_last=False))
    fused = [m for m in pipe.net.modules() if hasattr(m, "to_qkv") or hasattr(m, "to_kv")]
    assert fused, "no attention block of the UNet was fused"
    out = pipe.decode(pipe.latents(PROMPTS, SEEDS))
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


def test_channels_last_matches_the_plain_pipeline(ckpt, plain):
    _, ref = plain
    pipe = load_pipeline(ckpt, options=ServingOptions(fuse_qkv=False, channels_last=True))
    conv = pipe.net.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out = pipe.decode(pipe.latents(PROMPTS, SEEDS))
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)


def test_defaults_per_device_and_unset_fields_come_from_below():
    cpu = ServingOptions().resolved("cpu")
    assert (cpu.dtype, cpu.vae_dtype, cpu.fuse_qkv, cpu.channels_last, cpu.compile, cpu.vae) == (
        "fp32", "fp32", False, False, False, "full")
    gpu = ServingOptions(fuse_qkv=False).resolved("cuda:0")
    assert (gpu.dtype, gpu.fuse_qkv, gpu.channels_last) == ("bf16", False, True), "set fields win over defaults"


def test_tiny_vae_decodes_to_the_requested_size(ckpt, plain, tmp_path):
    from diffusers import AutoencoderTiny

    folder = _tiny_vae(tmp_path / "taesd")
    pipe = load_pipeline(ckpt, options=ServingOptions(vae="tiny", tiny_vae_path=folder))
    assert isinstance(pipe.teacher.vae, AutoencoderTiny)
    res = pipe.info.resolution
    images = pipe.generate_rows(PROMPTS, SEEDS, steps=None, width=res, height=res)
    assert images.shape == (2, res, res, 3) and images.dtype == np.uint8
    full = plain[0].generate_rows(PROMPTS, SEEDS, steps=None, width=res, height=res)
    assert not np.array_equal(images, full), "the tiny decoder was not the one used"


def test_tiny_vae_errors_name_the_setting(ckpt, tmp_path):
    with pytest.raises(ServingError) as err:
        ServingOptions(vae="tiny").resolved("cpu")
    assert err.value.setting == "FLASHDMD_GENERATE_TINY_VAE_PATH"
    with pytest.raises(ServingError, match="FLASHDMD_GENERATE_TINY_VAE_PATH.*no config.json"):
        ServingOptions(vae="tiny", tiny_vae_path=tmp_path / "missing").resolved("cpu")
    # An 8x decoder for a model whose VAE factor is 2: refused before any request decodes garbage.
    wrong = _tiny_vae(tmp_path / "taesd8", blocks=4)
    with pytest.raises(ServingError, match="VAE factor of 2") as err:
        load_pipeline(ckpt, options=ServingOptions(vae="tiny", tiny_vae_path=wrong))
    assert err.value.setting == "FLASHDMD_GENERATE_TINY_VAE_PATH"


def test_impossible_combinations_and_bad_values_name_the_setting():
    cases = [(ServingOptions(compile=True, compile_mode="reduce-overhead"), "FLASHDMD_GENERATE_COMPILE_MODE"),
             (ServingOptions(dtype="fp8"), "FLASHDMD_GENERATE_DTYPE"),
             (ServingOptions(vae="medium"), "FLASHDMD_GENERATE_VAE"),
             (ServingOptions(warm_batches=(0,)), "FLASHDMD_GENERATE_WARM_BATCHES")]
    for options, setting in cases:
        with pytest.raises(ServingError) as err:
            options.resolved("cpu")
        assert err.value.setting == setting and setting in str(err.value)
    from inference.cli import serving_options

    with pytest.raises(ServingError, match="WIDTHxHEIGHT"):
        serving_options(("warm_sizes=1024",))


def test_settings_parse_into_typed_options(monkeypatch, tmp_path):
    from api.generate_runtime import serving_options
    from api.settings import Settings

    # The deprecated pair still works for one release (sizes x batches), with a warning naming WARM_SHAPES.
    for name, value in {"FLASHDMD_GENERATE_WARM_SIZES": "1024x1024, 768x1344", "FLASHDMD_GENERATE_WARM_BATCHES":
                        "1,4,8", "FLASHDMD_GENERATE_COMPILE": "true", "FLASHDMD_GENERATE_DTYPE": "bf16"}.items():
        monkeypatch.setenv(name, value)
    with pytest.warns(DeprecationWarning, match="FLASHDMD_GENERATE_WARM_SHAPES"):
        settings = Settings(data_dir=tmp_path)
    opts = serving_options(settings, "cpu")
    assert opts.warm_sizes == ((1024, 1024), (768, 1344)) and opts.warm_batches == (1, 4, 8)
    assert opts.compile is True and opts.dtype == "bf16" and opts.fuse_qkv is None
    assert opts.warm_shapes(512) == [(1, 1024, 1024), (4, 1024, 1024), (8, 1024, 1024), (1, 768, 1344),
                                     (4, 768, 1344), (8, 768, 1344)]
    # The one grammar says the same in one variable.
    monkeypatch.delenv("FLASHDMD_GENERATE_WARM_SIZES")
    monkeypatch.delenv("FLASHDMD_GENERATE_WARM_BATCHES")
    monkeypatch.setenv("FLASHDMD_GENERATE_WARM_SHAPES", "1024x1024x1,1024x1024x4,768x1344x8")
    again = serving_options(Settings(data_dir=tmp_path), "cpu")
    assert (again.warm_sizes, again.warm_batches) == (opts.warm_sizes, opts.warm_batches)
    assert again.compile_cache_dir == tmp_path / "compile-cache"


def test_serving_json_round_trips_through_export_and_load(ckpt, plain, tmp_path):
    validated = ServingOptions(fuse_qkv=True, channels_last=True, warm_batches=(1, 2), warm_sizes=((32, 32),),
                               compile_cache_dir=tmp_path / "machine-specific")
    out = export_checkpoint(ckpt, "diffusers", tmp_path / "exported", serving=validated)
    written = json.loads((out / SERVING_FILE).read_text())
    assert written == {"fuse_qkv": True, "channels_last": True, "warm_batches": [1, 2], "warm_sizes": [[32, 32]]}
    assert ServingOptions.read(out) == ServingOptions(fuse_qkv=True, channels_last=True, warm_batches=(1, 2),
                                                      warm_sizes=((32, 32),))

    info = CheckpointInfo.load(out)  # the exported folder is a loadable checkpoint of its own
    assert (info.timesteps, info.family, info.generator) == (tuple(plain[0].info.timesteps), "sdxl", "unet")
    pipe = load_pipeline(out, options=ServingOptions())
    assert pipe.options.fuse_qkv and pipe.options.channels_last and pipe.options.warm_batches == (1, 2)
    torch.testing.assert_close(pipe.decode(pipe.latents(PROMPTS, SEEDS)), plain[1], atol=2e-4, rtol=1e-4)
    # What the operator sets wins over the folder's serving.json.
    mine = load_pipeline(out, options=ServingOptions(fuse_qkv=False))
    assert mine.options.fuse_qkv is False and mine.options.channels_last is True


def test_cache_budget_is_a_share_of_the_gpu_on_cuda_and_bytes_on_cpu():
    gib = 2**30
    assert cache_budget_bytes("cuda:0", 8 * gib, 0.5, total_bytes=80 * gib) == 40 * gib
    assert cache_budget_bytes("cuda", 8 * gib, 0.6, total_bytes=141 * gib) == int(141 * gib * 0.6)
    assert cache_budget_bytes("cpu", 8 * gib, 0.5, total_bytes=80 * gib) == 8 * gib
    with pytest.raises(ServingError, match="FLASHDMD_GENERATE_GPU_MEMORY_FRACTION"):
        cache_budget_bytes("cuda", 8 * gib, 0.0, total_bytes=80 * gib)


def test_warm_up_samples_every_warm_shape_and_prompts_are_cached(ckpt):
    pipe = load_pipeline(ckpt, options=ServingOptions(warm_batches=(1, 3)))
    report = warm_up(pipe)
    assert [(s["batch"], s["width"], s["height"]) for s in report["shapes"]] == [(1, 32, 32), (3, 32, 32)]
    assert report["compile"] is False and all(s["seconds"] > 0 for s in report["shapes"])
    first = pipe.encode_one("a red cat", 32, 32)
    assert pipe.encode_one("a red cat", 32, 32) is first, "a repeated prompt must not be encoded again"
    torch.testing.assert_close(first.embeds, pipe.encode(["a red cat"], 32, 32).embeds)


CHILD = """
import json, sys
from pathlib import Path
import numpy as np, torch
from inference.pipeline import load_pipeline
from inference.serving import ServingOptions, warm_up
ckpt, cache = sys.argv[1], Path(sys.argv[2])
pipe = load_pipeline(ckpt, options=ServingOptions(compile=True, compile_cache_dir=cache, warm_batches=(2,)))
report = warm_up(pipe)
graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
got = pipe.generate_rows(["a red cat", "a digit"], [3, 4], steps=None, width=32, height=32)
ref = load_pipeline(ckpt).generate_rows(["a red cat", "a digit"], [3, 4], steps=None, width=32, height=32, pad_to=2)
one = pipe.generate_rows(["a red cat"], [3], steps=None, width=32, height=32)  # padded up to the warm batch
print(json.dumps({**report, "graphs": graphs, "max_diff": int(np.abs(got.astype(int) - ref.astype(int)).max()),
                  "graphs_after_one_row": torch._dynamo.utils.counters["stats"]["unique_graphs"],
                  "one_row_same": bool(np.array_equal(one[0], got[0]))}))
"""


@pytest.mark.slow
def test_compile_at_warm_up_is_reused_from_the_disk_cache_after_a_restart(ckpt, tmp_path):
    """Two fresh processes on one cache folder: the first compiles and saves the artifacts, the second (a
    restart) loads them; both serve the compiled graph, and its images match the eager pipeline's."""
    import os
    import subprocess
    import sys

    # One intra-op thread: OpenMP spin-waits on a shared CPU turn minutes of compile into many more.
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(tmp_path / "cache")], capture_output=True,
                              text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["compile"] and cold["cache_loaded"] is None and cold["graphs"] >= 1
    assert (tmp_path / "cache" / "torch-compile-artifacts.bin").is_file()
    assert warm["cache_loaded"] is not None and warm["graphs"] >= 1
    assert warm["cache_counters"].get("fxgraph_cache_hit", 0) >= 1 and not warm["cache_counters"].get(
        "fxgraph_cache_miss"), warm["cache_counters"]
    assert cold["max_diff"] <= 2 and warm["max_diff"] <= 2
    assert [s["batch"] for s in warm["shapes"]] == [2]
    # A lone row is padded up to the warmed batch: no new graph, and the row's bytes as in the pair.
    assert warm["graphs_after_one_row"] == warm["graphs"] and warm["one_row_same"]


def test_rows_beyond_the_fixed_batch_go_in_calls_of_that_many_with_unchanged_bytes(plain):
    pipe, _ = plain
    prompts, seeds = ["a", "b", "c"], [5, 6, 7]
    together = pipe.generate_rows(prompts, seeds, steps=None, width=32, height=32, pad_to=2)
    alone = [pipe.generate_rows([p], [s], steps=None, width=32, height=32, pad_to=2)[0]
             for p, s in zip(prompts, seeds, strict=True)]
    assert together.shape == (3, 32, 32, 3)
    assert all(np.array_equal(together[i], alone[i]) for i in range(3))


def test_export_cli_writes_the_serving_options_it_is_given(ckpt, tmp_path):
    from click.testing import CliRunner

    from inference.cli import export_command

    runner = CliRunner()
    bad = runner.invoke(export_command, [str(ckpt), "--format", "unet", "-o", str(tmp_path / "x"),
                                         "--serving", "warm_sizes=big"])
    assert bad.exit_code == 2 and "FLASHDMD_GENERATE_WARM_SIZES" in bad.output
    ok = runner.invoke(export_command, [str(ckpt), "--format", "unet", "-o", str(tmp_path / "u"),
                                        "--serving", "compile=true", "--serving", "warm_batches=1,4"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "u" / SERVING_FILE).read_text()) == {"compile": True, "warm_batches": [1, 4]}
