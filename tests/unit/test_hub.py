"""Hub ids for SAM, reward-model and scorer weights, resolved offline from a local hub cache (no hub here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from api.spec_paths import resolve_location
from trainer.discriminator import load_sam_image_encoder
from trainer.errors import InputError
from trainer.hub import HubRef, parse_hub_ref, resolve_weights

REPO = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef0123456789abcdef01234567"
PTH = (".pth", ".pt", ".safetensors")


def add_snapshot(cache: Path, repo: str, files: dict[str, bytes | Path], sha: str = SHA, ref: str | None = "main") -> Path:
    """The layout huggingface_hub writes: models--org--name/snapshots/<sha>/... and refs/<branch> -> sha."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / sha
    for name, content in files.items():
        dest = snap / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copytree(content, dest) if content.is_dir() else shutil.copy(content, dest)
        else:
            dest.write_bytes(content)
    if ref is not None:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub: huggingface_hub reads these constants at call time (the env only at import)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize(("value", "ref"), [
    ("org/name", HubRef("org/name", None, None)),
    ("org/name@v1.0", HubRef("org/name", None, "v1.0")),
    ("org/name/sub/sam.pth@" + SHA, HubRef("org/name", "sub/sam.pth", SHA)),
    ("/abs/org/name", None), ("./org/name", None), ("~/org/name", None), ("name", None),
    ("org/../name", None), ("org/name/.hidden", None), ("org/name@", None),
])
def test_parse_hub_ref(value, ref):
    assert parse_hub_ref(value) == ref


def test_local_paths_pass_through_unchanged(tmp_path):
    f = tmp_path / "sam.pth"
    assert resolve_weights(str(f), "x", want="file", suffixes=PTH) == f  # missing: the loader says so, as before


def test_file_and_folder_references_resolve_from_the_cache(hub_cache):
    snap = add_snapshot(hub_cache, "org/sam", {"sam_tiny.pth": b"w", "README.md": b"r", "sub/other.bin": b"o"})
    assert resolve_weights("org/sam", "f", want="file", suffixes=PTH) == snap / "sam_tiny.pth"
    got = resolve_weights("org/sam/sam_tiny.pth", "f", want="file", suffixes=PTH)
    assert got.read_bytes() == b"w"
    assert resolve_weights(f"org/sam@{SHA}", "f", want="file", suffixes=PTH) == snap / "sam_tiny.pth"
    assert resolve_weights("org/sam", "f", want="folder") == snap
    assert resolve_weights("org/sam/sub", "f", want="folder") == snap / "sub"


def test_unresolvable_hub_ids_name_the_field(hub_cache):
    add_snapshot(hub_cache, "org/two", {"a.pth": b"a", "b.safetensors": b"b"})
    with pytest.raises(InputError, match=r"^distill\.discriminator\.checkpoint: .*org/two has 2 files .*name one"):
        resolve_weights("org/two", "distill.discriminator.checkpoint", want="file", suffixes=PTH)
    with pytest.raises(InputError, match=r"^rl\.reward\.path: cannot resolve hub id 'org/absent'.*HF_HUB_OFFLINE"):
        resolve_weights("org/absent", "rl.reward.path", want="folder")
    with pytest.raises(InputError, match=r"^rl\.reward\.path: cannot resolve hub id 'org/two@v9'.*not in the hub cache"):
        resolve_weights("org/two@v9", "rl.reward.path", want="folder")  # a revision that was never downloaded
    with pytest.raises(InputError, match=r"^f: cannot resolve hub id 'org/two/c.pth'"):
        resolve_weights("org/two/c.pth", "f", want="file", suffixes=PTH)


def test_sam_weights_load_from_a_hub_id(hub_cache, tmp_path):
    enc = load_sam_image_encoder("tiny", None)
    trained = {k: v + 1.0 for k, v in enc.state_dict().items()}  # unlike the seeded init
    torch.save({f"image_encoder.{k}": v for k, v in trained.items()}, tmp_path / "sam.pth")
    add_snapshot(hub_cache, "org/sam-tiny", {"sam.pth": tmp_path / "sam.pth"})
    loaded = load_sam_image_encoder("tiny", "org/sam-tiny@main").state_dict()
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    with pytest.raises(InputError, match="distill.discriminator.checkpoint: cannot resolve hub id 'org/sam-large'"):
        load_sam_image_encoder("tiny", "org/sam-large")


def test_a_scorer_from_a_hub_id_scores_like_the_same_local_folder(hub_cache, tmp_path):
    from inference.scorers import build_scorer
    from inference.tiny_scorers import tiny_clip_dir
    from trainer.jobspec import ScorerSpec

    local = tiny_clip_dir(tmp_path / "clip")
    add_snapshot(hub_cache, "org/clip", {"clip": local})
    images, prompts = torch.rand(2, 3, 32, 32) * 2 - 1, ["a red cat", "a dog"]
    results = []
    for path in (str(local), "org/clip/clip"):
        scorer = build_scorer(ScorerSpec(kind="clip", path=path))
        scorer.update(images, prompts)
        results.append(scorer.result())
    assert results[0] == results[1] and "clip" in results[0]


def test_hf_env_vars_drive_the_resolver_in_a_fresh_process(tmp_path):
    snap = add_snapshot(tmp_path / "hub", "org/sam", {"w.safetensors": b"x"})
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    code = ("from trainer.hub import resolve_weights as r; print(r('org/sam', 'f', want='file', suffixes=('.pth', "
            "'.safetensors')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(snap / "w.safetensors")


@pytest.mark.parametrize(("value", "ok"), [
    ("org/sam", True), ("org/sam/sam_vit_l.pth@main", True), ("org/../x", False), ("relative/../../etc", False),
    ("/outside/sam.pth", False),
])
def test_api_allows_hub_refs_for_weights_but_keeps_root_checks_for_paths(value, ok, tmp_path):
    assert (resolve_location(value, roots=[tmp_path], hub_ok=False, tiny_ok=False, hub_ref_ok=True) is not None) == ok
    # Where hub refs are not allowed (data files), the same values are refused.
    assert resolve_location(value, roots=[tmp_path], hub_ok=False, tiny_ok=False) is None
    inside = tmp_path / "sam.pth"
    assert resolve_location(str(inside), roots=[tmp_path], hub_ok=False, tiny_ok=False, hub_ref_ok=True) == str(inside)


def test_check_spec_paths_over_the_api(tmp_path):
    """POST /jobs' path check: hub refs pass for weights, validation.file and local weights keep their roots."""
    from api.errors import APIError
    from api.settings import Settings
    from api.spec_paths import check_spec_paths

    models, data = tmp_path / "models", tmp_path / "data"
    models.mkdir()
    data.mkdir()
    settings = Settings(data_dir=tmp_path / "d", allowed_model_roots=[models], allowed_data_roots=[data])
    spec = {"distill": {"discriminator": {"checkpoint": "facebook/sam-vit-l/sam_vit_l.pth@main"}},
            "rl": {"reward": {"path": "org/lrm-sdxl"}},
            "train": {"validation": {"file": str(data / "val.txt")}}}
    assert check_spec_paths(spec, settings=settings)["rl"]["reward"]["path"] == "org/lrm-sdxl"
    bad = {"distill": {"discriminator": {"checkpoint": str(tmp_path / "sam.pth")}},
           "train": {"validation": {"file": str(models / "val.txt")}}}
    with pytest.raises(APIError) as err:
        check_spec_paths(bad, settings=settings)
    assert err.value.fields == ["spec.distill.discriminator.checkpoint", "spec.train.validation.file"]
    assert "a hub id (org/name[/file][@revision]) or an absolute path under the allowed roots" in str(err.value)


def test_the_reward_model_loads_from_a_hub_id(hub_cache, tmp_path, make_cfg, tiny_dir):
    from trainer.jobspec import ModelSpec, RewardSpec
    from trainer.models import load_teacher
    from trainer.reward import LatentRewardModel, save_lrm
    from trainer.rl_loop import build_reward
    from trainer.sink import JsonlSink

    teacher = load_teacher(ModelSpec(teacher=str(tiny_dir("sdxl"))))
    save_lrm(LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution, seed=3), tmp_path / "lrm")
    add_snapshot(hub_cache, "org/lrm", {"sdxl-lrm": tmp_path / "lrm"})
    seed, sink = make_cfg().train.seed, JsonlSink(tmp_path / "run")
    z, t = torch.randn(2, teacher.latent_channels, 16, 16), torch.tensor([999, 249])
    scores = []
    for path in (str(tmp_path / "lrm"), "org/lrm/sdxl-lrm@main"):
        with torch.no_grad():
            scores.append(build_reward(RewardSpec(path=path), teacher, seed, sink).score(z, t, ["a cat", "a dog"]))
    torch.testing.assert_close(scores[0], scores[1])
    with pytest.raises(InputError, match=r"^rl\.reward\.path: cannot resolve hub id 'org/lrm@v2'"):
        build_reward(RewardSpec(path="org/lrm@v2"), teacher, seed, sink)
    sink.close()
