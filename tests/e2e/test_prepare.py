"""`flashdmd data prepare` end to end on the tiny SDXL teacher: the cache trains exactly like the raw folder,
another teacher's cache is refused, a crashed prepare resumes, corrupt images are skipped and counted."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from accelerate import Accelerator
from click.testing import CliRunner
from PIL import Image

from api.cli import cli
from trainer.data import build_dataset, sharded_batches
from trainer.errors import InputError
from trainer.jobspec import parse_spec
from trainer.models import load_teacher
from trainer.tiny import tiny_pipeline_dir

# (width, height): two wide, two tall, two square images; bucket list derived from 32^2 pixels, step 8.
SIZES = [(64, 32), (70, 30), (30, 64), (28, 60), (40, 40), (50, 48)]
BUCKETS = {"enabled": True, "step": 8, "target_pixels": 1024, "crop": "random"}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate(SIZES):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a picture number {i}")
    (root / "99.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # header only: unreadable
    return root


def _cfg(teacher_dir, data: dict, mode: str):
    return parse_spec({
        "model": {"teacher": str(teacher_dir)}, "data": data,
        "distill": {"mode": mode, "real_guidance": 2.0, "discriminator": {"backbone": "tiny", "head_channels": 16}},
        "optim": {"generator": {"lr": 1e-3}, "fake_score": {"lr": 1e-3}, "discriminator": {"lr": 1e-3}},
        "train": {"batch_size": 2, "mixed_precision": "no", "max_steps": 1, "seed": 7}})


def _prepare(teacher_dir, folder, out, *extra: str):
    res = CliRunner().invoke(cli, ["data", "prepare", str(folder), "-o", str(out), "--teacher", str(teacher_dir),
                                   "--buckets", "derived", "--target-pixels", "1024", "--step", "8", "--crop",
                                   "random", "--seed", "7", "--shard-size", "4", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cache(teacher_dir, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    summary = _prepare(teacher_dir, folder, out)
    assert summary["images"] == len(SIZES) and summary["skipped"] == 1
    return out


def _first_step(cfg):
    from trainer.datacache import attach_cache
    from trainer.distill import Distiller
    from trainer.loop import data_preprocess

    teacher = load_teacher(cfg.model)
    ds = build_dataset(cfg.data, teacher.resolution, cfg.train.seed)
    if cfg.data.cache:
        attach_cache(ds, teacher, data_preprocess(cfg, teacher.resolution))
    batch = next(sharded_batches(ds, 2, cfg.train.seed))
    torch.manual_seed(0)
    logs = Distiller.for_job(cfg, teacher, Accelerator(cpu=True)).step(batch, 0)
    return {k: v for k, v in logs.items() if k.startswith("loss/")}, batch[0]


@pytest.mark.parametrize("mode", ["flash", "dmd2"])  # pixels to the Pixel-GAN; cached posteriors to DMD2's GAN
def test_training_on_the_cache_matches_training_on_the_raw_folder(teacher_dir, folder, cache, mode):
    raw_logs, raw_batch = _first_step(_cfg(teacher_dir, {"images": str(folder), "buckets": BUCKETS}, mode))
    cached_logs, cached_batch = _first_step(_cfg(teacher_dir, {"cache": str(cache), "buckets": BUCKETS}, mode))
    assert torch.equal(raw_batch["image"], cached_batch["image"])
    assert torch.equal(raw_batch["time_ids"], cached_batch["time_ids"])
    assert raw_batch["caption"] == cached_batch["caption"]
    assert raw_logs.keys() == cached_logs.keys() and len(raw_logs) >= 2
    for k, v in raw_logs.items():
        assert cached_logs[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_a_cache_for_another_teacher_or_preprocessing_is_refused(teacher_dir, cache, tmp_path):
    from trainer.datacache import CacheDataset, attach_cache
    from trainer.loop import data_preprocess

    other = tmp_path / "other-teacher"
    shutil.copytree(teacher_dir, other)
    cfg = _cfg(other, {"cache": str(cache), "buckets": BUCKETS}, "flash")
    with pytest.raises(InputError, match=r"data.cache: .* prepared for another teacher"):
        attach_cache(CacheDataset(cache), load_teacher(cfg.model), data_preprocess(cfg, 32))
    cfg = _cfg(teacher_dir, {"cache": str(cache), "buckets": {**BUCKETS, "crop": "center"}}, "flash")
    with pytest.raises(InputError, match=r"data.cache: .* other preprocessing: crop='random' \(this spec: 'center'\)"):
        attach_cache(CacheDataset(cache), load_teacher(cfg.model), data_preprocess(cfg, 32))


def test_corrupt_images_are_skipped_and_counted_in_the_manifest(cache):
    lat = json.loads((cache / "manifest.json").read_text())["latents"]
    assert [k for k, _ in lat["skipped"]] == ["99.png"]
    assert sum(s["count"] for s in lat["shards"].values()) == len(SIZES) and lat["consumed"] == len(SIZES) + 1


def test_a_crashed_prepare_resumes_and_keeps_its_finished_shards(teacher_dir, folder, cache, tmp_path):
    from trainer.data import resolve_buckets
    from trainer.datacache import CacheDataset
    from trainer.prepare import prepare

    out = tmp_path / "c"
    teacher = load_teacher(parse_spec({"model": {"teacher": str(teacher_dir)}, "data": {"builtin": "digits"}}).model)
    sizes = resolve_buckets(_cfg(teacher_dir, {"images": str(folder), "buckets": BUCKETS}, "flash").data.buckets, 32)
    first = prepare(str(folder), out, teacher, buckets=sizes, crop="random", seed=7, shard_size=4, limit=5,
                    progress=False)  # "crashes" after 5 source positions: one full shard and a partial one
    assert first.total == 5
    shard0 = out / "latents" / "shard-00000.safetensors"
    before = shard0.stat().st_mtime_ns
    summary = _prepare(teacher_dir, folder, out)
    assert summary["written"] == len(SIZES) - 5 and summary["images"] == len(SIZES)
    assert shard0.stat().st_mtime_ns == before, "a finished shard is not redone"
    resumed, whole = CacheDataset(out), CacheDataset(cache)
    assert resumed.captions == whole.captions
    for i in range(len(whole)):
        a, b = resumed[i], whole[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["time_ids"], b["time_ids"])
        assert torch.allclose(a["moments"], b["moments"], atol=1e-5)


def test_prepare_runs_as_a_job_kind(teacher_dir, folder, tmp_path):
    from flashjob.cli import run_job
    from trainer.sink import JsonlSink

    cfg = parse_spec({"kind": "prepare", "model": {"teacher": str(teacher_dir)},
                      "prepare": {"source": str(folder), "shard_size": 100}})
    assert run_job(cfg, JsonlSink(tmp_path / "run"), run_dir=tmp_path / "run") == 1
    lat = json.loads((tmp_path / "run" / "cache" / "manifest.json").read_text())["latents"]
    assert lat["preprocess"]["buckets"] is None and sum(s["count"] for s in lat["shards"].values()) == len(SIZES)


def test_train_runs_from_the_cache_and_logs_skipped_raw_images(teacher_dir, folder, cache, tmp_path):
    from trainer.loop import train
    from trainer.sink import JsonlSink

    for name, data in (("cached", {"cache": str(cache)}), ("raw", {"images": str(folder)})):
        cfg = _cfg(teacher_dir, {**data, "buckets": BUCKETS}, "flash").model_copy(deep=True)
        cfg.train.sample_every = cfg.train.checkpoint_every = 100
        run = tmp_path / name
        assert train(cfg, JsonlSink(run), run_dir=run) == 1
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        skipped = [e for e in events if e["kind"] == "data_skipped"]
        assert (len(skipped), name) == ((1, "raw") if name == "raw" else (0, "cached"))
