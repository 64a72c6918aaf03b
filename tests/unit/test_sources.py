"""Data sources: folder, JSONL, webdataset tars, datasets folders and parquet; disjoint ranks, resume, skips."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from trainer.errors import InputError
from trainer.sources import Report, open_source


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20 + i, 16), (i * 7 % 255, 10, 99)).save(buf, format="PNG")
    return buf.getvalue()


N = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The same N samples as 4 webdataset tars, a 3-shard datasets folder and 2 parquet files."""
    import datasets
    import webdataset as wds

    root = tmp_path_factory.mktemp("sources")
    (root / "wds").mkdir()
    for s in range(4):
        with wds.TarWriter(str(root / "wds" / f"part-{s:03d}.tar")) as w:
            for i in range(s * 3, s * 3 + 3):
                w.write({"__key__": f"s{i:04d}", "png": _png(i), "txt": f"caption {i}"})
    feats = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(i), "path": None} for i in range(N)],
                                     "caption": [f"caption {i}" for i in range(N)]}, features=feats)
    ds.save_to_disk(str(root / "hf"), num_shards=3)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root / "hfdict"), num_shards={"train": 2})
    (root / "pq").mkdir()
    ds.select(range(6)).to_parquet(str(root / "pq" / "a.parquet"))
    ds.select(range(6, N)).to_parquet(str(root / "pq" / "b.parquet"))
    return root


def _captions(samples) -> list[str]:
    return [s.caption for s in samples]


@pytest.mark.parametrize("ref", ["wds", "wds/part-{000..003}.tar", "hf", "hfdict", "pq", "pq/*.parquet"])
def test_two_ranks_stream_disjoint_shards_that_cover_the_source(shards, ref):
    src = open_source(str(shards / ref))
    ranks = [_captions(src.stream(rank=r, world=2, seed=1)) for r in range(2)]
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(f"caption {i}" for i in range(N))
    assert _captions(src.stream(rank=0, world=2, seed=1)) == ranks[0], "the order is a function of the seed"
    orders = {tuple(_captions(src.stream(rank=0, world=2, seed=1, epoch=e))) for e in range(6)}
    assert len(orders) > 1, "each epoch reshuffles the shards"


@pytest.mark.parametrize("ref", ["wds", "hf"])
def test_a_resumed_stream_continues_mid_epoch(shards, ref):
    src = open_source(str(shards / ref))
    full = list(src.stream(rank=1, world=2, seed=4, epoch=2))
    cut = full[len(full) // 2 - 1].position + 1
    resumed = list(src.stream(rank=1, world=2, seed=4, epoch=2, start=cut))
    assert [(s.key, s.caption) for s in resumed] == [(s.key, s.caption) for s in full[len(full) // 2:]]


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png(i))
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    (tmp_path / "1.png").write_bytes(_png(1)[:40])  # truncated
    (tmp_path / "3.jpg").write_bytes(b"not an image")
    report = Report()
    got = list(open_source(str(tmp_path)).stream(report=report))
    assert _captions(got) == ["caption 0", "caption 2"]
    assert report.seen == 4 and sorted(k for k, _ in report.skipped) == ["1.png", "3.jpg"]
    assert "2 skipped" in report.summary()


def test_jsonl_source_and_its_errors(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(0))
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "caption": "cap"}) + "\n")
    (got,) = open_source(str(tmp_path / "m.jsonl")).stream()
    assert (got.key, got.caption, got.image.size) == ("a.png", "cap", (20, 16))
    (tmp_path / "bad.jsonl").write_text('{"caption": "no image"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        open_source(str(tmp_path / "bad.jsonl"))
    with pytest.raises(InputError, match="no such file"):
        open_source(str(tmp_path / "missing-{0..1}.tar"))


def test_a_source_line_outside_the_allowed_data_roots_is_refused(tmp_path, process_env):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (outside / "x.png").write_bytes(_png(0))
    (inside / "m.jsonl").write_text(json.dumps({"image": str(outside / "x.png"), "caption": "c"}) + "\n")
    process_env.setenv("FLASHDMD_ALLOWED_DATA_ROOTS", str(inside))
    with pytest.raises(InputError, match="not under the allowed data roots"):
        list(open_source(str(inside / "m.jsonl")).stream())
