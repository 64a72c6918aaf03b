"""Aspect-ratio buckets: assignment, SDXL's size/crop time_ids, one-bucket batches, per-sample conditioning."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from trainer.buckets import SDXL_BUCKETS, BucketBatchSampler, assign, derive_buckets, fit
from trainer.data import build_dataset, sharded_batches
from trainer.errors import InputError


def test_sdxl_list_and_derived_buckets_have_the_expected_sizes():
    assert len(SDXL_BUCKETS) == 41 and (1024, 1024) in SDXL_BUCKETS
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in SDXL_BUCKETS)
    derived = derive_buckets(1024 * 1024, 64)
    assert (1024, 1024) in derived and (768, 1344) in derived and (1344, 768) in derived
    assert all(h * w <= 1024 * 1024 and max(h / w, w / h) <= 4 for h, w in derived)


@pytest.mark.parametrize(("orig", "expected"), [((600, 800), (896, 1152)), ((1000, 1000), (1024, 1024)),
                                                ((2000, 500), (2048, 512)), ((720, 1280), (768, 1344)),
                                                ((480, 1280), (640, 1600))])
def test_assignment_picks_the_closest_aspect_ratio(orig, expected):
    assert SDXL_BUCKETS[assign(orig, SDXL_BUCKETS)] == expected


def test_time_ids_are_sdxls_original_size_crop_and_target():
    img = Image.new("RGB", (100, 50))  # width 100, height 50
    # Cover (24, 40): scale max(24/50, 40/100) = 0.48 -> 48 x 24, centre crop of width 40 starts at x = 4.
    f = fit(img, (24, 40), "center")
    assert f.image.size == (40, 24)
    assert f.time_ids == [50.0, 100.0, 0.0, 4.0, 24.0, 40.0]
    crops = {tuple(fit(img, (24, 40), "random", seed=3, key=f"k{i}").crop) for i in range(20)}
    assert all(top == 0 and 0 <= left <= 8 for top, left in crops) and len(crops) > 1
    again = fit(img, (24, 40), "random", seed=3, key="k7").crop
    assert again == fit(img, (24, 40), "random", seed=3, key="k7").crop, "a random crop is seeded per sample"


def _buckets_of(n: int = 40) -> list[int]:
    return [i % 3 if i % 5 else 3 for i in range(n)]  # four buckets of unequal sizes


def test_batches_never_mix_buckets_ranks_are_disjoint_and_resume_mid_epoch():
    bo = _buckets_of()
    full = [BucketBatchSampler(bo, 3, seed=5, rank=r, world=2, accum=2) for r in range(2)]
    per_rank = [[next(it) for _ in range(12)] for it in (iter(s) for s in full)]
    for batches in per_rank:
        assert all(len({bo[i] for i in b}) == 1 and len(b) == 3 for b in batches)
    epoch = full[0].per_epoch
    seen = [i for batches in per_rank for b in batches[: epoch // 2] for i in b]
    assert len(seen) == len(set(seen)), "the two ranks' batches within an epoch are disjoint"
    # Resumed at update 2 (4 micro-batches per rank consumed), each rank continues with the same batches.
    for r in range(2):
        resumed = BucketBatchSampler(bo, 3, seed=5, rank=r, world=2, accum=2, start=2)
        assert [next(iter(resumed)) for _ in range(1)] == per_rank[r][4:5]
        it = iter(resumed)
        assert [next(it) for _ in range(8)] == per_rank[r][4:12]


def test_a_batch_larger_than_every_bucket_is_a_clear_error():
    with pytest.raises(InputError, match="data.buckets"):
        BucketBatchSampler([0, 1, 2, 3], 2, seed=0)


def _image_folder(root, sizes):
    root.mkdir()
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i % 255, 90, 200)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"image number {i}")
    return root


def test_the_generator_trains_at_the_bucket_size_with_per_sample_time_ids(make_cfg, tmp_path):
    from trainer.distill import Distiller
    from trainer.models import load_teacher

    folder = _image_folder(tmp_path / "imgs", [(64, 32), (66, 30), (32, 64), (30, 60), (40, 40)])
    cfg = make_cfg("sdxl", data={"images": str(folder), "buckets": {"enabled": True, "step": 8,
                                                                    "target_pixels": 1024}},
                   distill__mode="dmd2", train__max_steps=1)
    teacher = load_teacher(cfg.model)
    ds = build_dataset(cfg.data, teacher.resolution, cfg.train.seed)
    wide, tall = ds.sizes[ds.buckets_of[0]], ds.sizes[ds.buckets_of[2]]
    assert ds.buckets_of[0] == ds.buckets_of[1] and wide[1] > wide[0]
    assert ds.buckets_of[2] == ds.buckets_of[3] and tall[0] > tall[1]
    batch = next(sharded_batches(ds, 2, seed=0))[0]
    assert tuple(batch["image"].shape[-2:]) in (wide, tall)
    d = Distiller.for_job(cfg, teacher, Accelerator(cpu=True))
    seen: list[tuple] = []

    def hook(_mod, args, kwargs):
        seen.append((tuple(args[0].shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].clone()))

    handle = d.generator.register_forward_pre_hook(hook, with_kwargs=True)
    logs = d.step([batch], 0)
    handle.remove()
    h, w = (int(v) for v in batch["time_ids"][0, 4:])
    assert seen and all(shape == (h // 2, w // 2) for shape, _ in seen), "latents at the bucket size"
    assert all(torch.equal(ids, batch["time_ids"].float()) for _, ids in seen if ids.shape[0] == 2)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in logs.items() if k.startswith("loss/"))
