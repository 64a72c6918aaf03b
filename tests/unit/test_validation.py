"""train.validation: fixed prompts and seeds drive the sample grids, and the same spec gives the same images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import validation
from trainer.errors import InputError
from trainer.jobspec import ModelSpec, SpecError
from trainer.loop import train
from trainer.models import load_teacher
from trainer.roots import ENV
from trainer.sink import JsonlSink
from trainer.validation import Cell, plan_validation, render_validation, sample_cells

S = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def teacher(tiny_root):
    from trainer.tiny import tiny_pipeline_dir

    return load_teacher(ModelSpec(teacher=str(tiny_pipeline_dir("sdxl", cache_root=tiny_root))))


def test_spec_bounds_and_sources(make_cfg):
    cfg = make_cfg(train__validation={"prompts": ["a cat"], "seeds": [3, 4], "sizes": [[64, 32]]})
    v = cfg.train.validation
    assert v.prompts == ["a cat"] and v.seeds == [3, 4] and v.sizes == [(64, 32)] and v.every is None
    with pytest.raises(SpecError, match="exactly one of train.validation.prompts and train.validation.file"):
        make_cfg(train__validation={"prompts": ["a"], "file": "/p.txt"})
    with pytest.raises(SpecError, match=r"train\.validation: .*1024 images .*limit is 256"):
        make_cfg(train__validation={"prompts": ["a"] * 64, "seeds": list(range(16))})
    with pytest.raises(SpecError, match=r"train\.validation\.sizes\.0\.1: .*multiple of 8"):
        make_cfg(train__validation={"prompts": ["a"], "sizes": [[64, 33]]})
    with pytest.raises(SpecError, match=r"train\.validation\.seeds"):
        make_cfg(train__validation={"prompts": ["a"], "seeds": []})


def test_default_plan_is_num_samples_captions_with_seed_i(make_cfg, teacher):
    from trainer.data import DigitsDataset

    ds = DigitsDataset(32)
    plan = plan_validation(make_cfg(train__num_samples=3).train, ds, teacher)
    assert [c.seed for c in plan.cells] == [0, 1, 2] and plan.sizes == [None] and plan.guidance == 1.0
    assert plan.prompts == [ds[0]["caption"], ds[(len(ds) - 1) // 2]["caption"], ds[len(ds) - 1]["caption"]]


def test_file_prompts_are_read_and_checked_against_the_data_roots(make_cfg, teacher, tmp_path, process_env):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "p.txt").write_text("a red cat\n\n  a blue dog  \n")
    (outside / "p.txt").write_text("secret\n")
    process_env.setenv(ENV, str(inside))
    cfg = make_cfg(train__validation={"file": str(inside / "p.txt"), "seeds": [5, 6], "every": 7})
    plan = plan_validation(cfg.train, None, teacher)
    assert plan.prompts == ["a red cat", "a red cat", "a blue dog", "a blue dog"]
    assert [(c.row, c.col, c.seed) for c in plan.cells] == [(0, 0, 5), (0, 1, 6), (1, 0, 5), (1, 1, 6)]
    assert plan.every == 7 and plan.due(14, 100) and not plan.due(15, 100) and plan.due(100, 100)
    cfg = make_cfg(train__validation={"file": str(outside / "p.txt")})
    with pytest.raises(InputError, match="train.validation.file: .* is not under the allowed data roots"):
        plan_validation(cfg.train, None, teacher)
    (inside / "many.txt").write_text("p\n" * 65)
    with pytest.raises(InputError, match="train.validation.file: .* 65 prompts; the limit is 64"):
        plan_validation(make_cfg(train__validation={"file": str(inside / "many.txt")}).train, None, teacher)


def test_a_size_the_latents_cannot_take_fails_at_plan_time(make_cfg, teacher):
    m = teacher.vae_scale
    if 8 % m == 0:  # every spec-valid size (multiple of 8) fits this teacher's factor: nothing to refuse
        cfg = make_cfg(train__validation={"prompts": ["a"], "sizes": [[8 * m, 16]]})
        assert plan_validation(cfg.train, None, teacher).sizes == [(8 * m, 16)]
    else:
        cfg = make_cfg(train__validation={"prompts": ["a"], "sizes": [[8, 8]]})
        with pytest.raises(InputError, match="train.validation.sizes"):
            plan_validation(cfg.train, None, teacher)


def test_a_cell_depends_on_its_prompt_and_seed_only(teacher):
    net = teacher.denoiser
    a, b = Cell("a handwritten digit one", 11, 0, 0), Cell("a handwritten digit two", 12, 0, 1)
    alone = sample_cells(net, teacher, S, teacher.param, [a], None, 1.0)
    # In another batch, behind other cells: the same noise, so the same image up to batched-kernel rounding.
    mixed = sample_cells(net, teacher, S, teacher.param, [b, b, a], None, 1.0)
    torch.testing.assert_close(mixed[2], alone[0], rtol=1e-4, atol=1e-4)
    other_seed = sample_cells(net, teacher, S, teacher.param, [Cell(a.prompt, 99, 0, 0)], None, 1.0)
    assert (other_seed[0] - alone[0]).abs().mean() > 1e-2
    # A non-square size gives latents of that size, conditioned (SDXL time_ids) on it.
    w, h = 4 * teacher.vae_scale, 2 * teacher.vae_scale
    wide = sample_cells(net, teacher, S, teacher.param, [a], (w, h), 2.0)
    assert wide.shape[-2:] == (2, 4) and torch.isfinite(wide).all()


def test_render_writes_a_grid_per_size_and_names_every_cell(teacher, make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(train__validation={"prompts": ["p one", "p two"], "seeds": [1, 2, 3],
                                      "sizes": [[32, 32], [64, 32]]})
    plan = plan_validation(cfg.train, None, teacher)
    paths, lat = render_validation(teacher.denoiser, teacher, S, teacher.param, plan, 5, tmp_path)
    assert [p.name for p in paths] == ["step-00000005.png", "step-00000005-64x32.png"]
    assert Image.open(paths[0]).size == (3 * 32, 2 * 32) and Image.open(paths[1]).size == (3 * 64, 2 * 32)
    assert lat.shape[0] == 6
    meta = json.loads((tmp_path / "step-00000005.json").read_text())
    assert [(c["prompt"], c["seed"]) for c in meta["cells"]] == [
        ("p one", 1), ("p one", 2), ("p one", 3), ("p two", 1), ("p two", 2), ("p two", 3)]
    assert [g["file"] for g in meta["grids"]] == [p.name for p in paths]
    assert meta["grids"][1]["size"] == [64, 32] and meta["grids"][1]["cols"] == 3
    # Nothing written on a rank without an output folder, but the same latents.
    none, lat2 = render_validation(teacher.denoiser, teacher, S, teacher.param, plan, 5, None)
    assert none == [] and torch.equal(lat, lat2)
    # Sampled and decoded in chunks of 4 (a grid too big for one batch): the same grid, cell by cell.
    monkeypatch.setattr(validation, "CHUNK", 4)
    chunked, _ = render_validation(teacher.denoiser, teacher, S, teacher.param, plan, 6, tmp_path)
    a, b = (np.asarray(Image.open(p)).astype(np.int16) for p in (paths[0], chunked[0]))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def _grid(run_dir):
    return (run_dir / "samples" / "step-00000001.png").read_bytes()


def test_validation_prompts_drive_the_training_grids_and_repeat_across_runs(make_cfg, tmp_path):
    spec = {"prompts": ["a handwritten digit four", "a handwritten digit nine"], "seeds": [7, 8]}
    cfg = make_cfg(train__max_steps=1, train__validation=spec)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        sink = JsonlSink(run)
        train(cfg, sink, run_dir=run)
        sink.close()
    assert _grid(runs[0]) == _grid(runs[1])  # same spec, same seeds: the same bytes
    meta = json.loads((runs[0] / "samples" / "step-00000001.json").read_text())
    assert [c["prompt"] for c in meta["cells"]] == [spec["prompts"][0]] * 2 + [spec["prompts"][1]] * 2
    events = [json.loads(x) for x in (runs[0] / "events.jsonl").read_text().splitlines()]
    assert [e["data"]["path"] for e in events if e["kind"] == "sample"] == [str(runs[0] / "samples" / "step-00000001.png")]
    grid = np.asarray(Image.open(runs[0] / "samples" / "step-00000001.png")).astype(np.int16)
    side = grid.shape[0] // 2
    assert grid.shape[1] == 2 * side  # 2 prompts (rows) x 2 seeds (columns)
    assert np.abs(grid[:side, :side] - grid[:side, side:]).mean() > 1  # seed 7 vs seed 8: different images


def test_validation_prompts_join_the_text_cache(make_cfg, tmp_path):
    """memory.text_cache: the grid's prompts are encoded once with the captions, not on the CPU at every grid."""
    from accelerate import Accelerator

    from trainer.data import DigitsDataset
    from trainer.textcache import prepare_text_cache

    prompts = ["a violet zebra", "a handwritten digit four"]
    cfg = make_cfg(memory__text_cache=True, train__validation={"prompts": prompts})
    teacher = load_teacher(cfg.model)
    ds = DigitsDataset(32)
    plan = plan_validation(cfg.train, ds, teacher)
    prepare_text_cache(cfg, teacher, ds, tmp_path, Accelerator(cpu=True), plan.prompts)
    cached = teacher.encode(plan.prompts)
    assert teacher.text_cache_misses == 0
    assert cached.embeds.shape[0] == len(plan.prompts)
    teacher.encode(["not a validation prompt"])
    assert teacher.text_cache_misses == 1  # the count does see misses
