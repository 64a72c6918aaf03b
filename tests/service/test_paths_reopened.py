"""a data file or model folder swapped for a symlink after submit was read from outside the roots.

Every spec field that names a file is checked at submit by the API and again, after realpath, where the
trainer opens it, with the roots the worker passes down (api/runner.py roots_env) and the one shared
"path under root" function (trainer/roots.py under_root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from servicekit import TINY_SPEC

from api.runner import roots_env
from trainer.data import build_dataset
from trainer.errors import InputError
from trainer.jobspec import DataSpec

pytestmark = pytest.mark.service
SECRET = "another user's prompt\n"


@pytest.fixture
def trainer_env(settings, process_env):
    """The environment the worker spawns the trainer with, as the trainer's process entry installs it."""
    for key, value in roots_env(settings).items():
        process_env.setenv(key, value)


def _swap_for_link(path: Path, target: Path) -> None:
    """Replace a checked file (or folder) with a symlink, as an attacker with write access to it would."""
    if path.is_dir():
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
    else:
        path.unlink()
    path.symlink_to(target)


def _submitted(client, auth, roots, name: str, data: dict) -> dict:
    spec = {**TINY_SPEC, "data": data}
    if "prompts" in data:  # prompts only: no real images for the GAN
        spec["distill"] = {**TINY_SPEC["distill"], "gan_weight": 0}
    res = client.post("/jobs", json={"spec": spec}, headers=auth)
    assert res.status_code == 201, res.text
    return res.json()["spec"]["data"]


def test_data_prompts_swapped_after_submit_is_refused_where_it_is_opened(client, auth, roots, trainer_env,
                                                                          tmp_path) -> None:
    prompts = roots["data"] / f"prompts-{tmp_path.name}.txt"
    prompts.write_text("a handwritten digit seven\n")
    data = _submitted(client, auth, roots, "prompts", {"prompts": str(prompts)})
    assert len(build_dataset(DataSpec(**data), 32)) == 1  # before the swap: read as checked
    secret = roots["outside"] / f"secret-{tmp_path.name}.txt"
    secret.write_text(SECRET)
    _swap_for_link(prompts, secret)
    with pytest.raises(InputError, match=r"^data\.prompts: .* is not under the allowed data roots"):
        build_dataset(DataSpec(**data), 32)


def test_data_images_and_manifest_swapped_after_submit_are_refused(client, auth, roots, trainer_env,
                                                                   tmp_path) -> None:
    from PIL import Image

    folder = roots["data"] / f"images-{tmp_path.name}"
    folder.mkdir()
    Image.new("RGB", (32, 32)).save(folder / "a.png")
    manifest = roots["data"] / f"manifest-{tmp_path.name}.jsonl"
    manifest.write_text('{"image": "%s", "caption": "x"}\n' % (folder / "a.png"))
    images = _submitted(client, auth, roots, "images", {"images": str(folder)})
    listed = _submitted(client, auth, roots, "manifest", {"manifest": str(manifest)})
    outside = roots["outside"] / f"images-{tmp_path.name}"
    outside.mkdir()
    Image.new("RGB", (32, 32)).save(outside / "b.png")
    (outside / "m.jsonl").write_text('{"image": "b.png", "caption": "x"}\n')
    _swap_for_link(manifest, outside / "m.jsonl")
    with pytest.raises(InputError, match=r"^data\.manifest: "):
        build_dataset(DataSpec(**listed), 32)
    _swap_for_link(folder, outside)
    with pytest.raises(InputError, match=r"^data\.images: "):
        build_dataset(DataSpec(**images), 32)


def test_cache_validation_eval_and_scorer_files_are_checked_where_opened(roots, trainer_env, tmp_path) -> None:
    from inference.evaluate import read_prompts
    from trainer.roots import check_opened
    from trainer.validation import read_prompt_file

    secret = roots["outside"] / f"secret-{tmp_path.name}.txt"
    secret.write_text(SECRET)
    link = roots["data"] / f"link-{tmp_path.name}.txt"
    link.symlink_to(secret)
    with pytest.raises(InputError, match=r"^train\.validation\.file: "):
        read_prompt_file(str(link))
    with pytest.raises(InputError, match=r"^eval\.prompts: "):
        read_prompts(str(link), None)
    with pytest.raises(InputError, match=r"^data\.cache: "):
        build_dataset(DataSpec(cache=str(roots["outside"])), 32)
    with pytest.raises(InputError, match=r"model roots"):
        check_opened(str(secret), "eval.scorers (clip).path", kind="model")
    # Inside the roots (or, for a cache, a run directory under the run root) the realpath is handed back.
    assert check_opened(str(roots["data"]), "data.images") == Path(os.path.realpath(roots["data"]))


def _moved_out(path: Path, outside: Path) -> None:
    """Move a checked file or folder (contents intact) outside the roots and leave a symlink to it in its place."""
    shutil.move(path, outside)
    path.symlink_to(outside)


def _created(client, auth, spec: dict) -> dict:
    res = client.post("/jobs", json={"spec": spec}, headers=auth)
    assert res.status_code == 201, res.text
    return res.json()["spec"]


def test_teacher_folder_swapped_after_submit_is_refused_where_it_is_loaded(client, auth, roots, trainer_env,
                                                                             tmp_path) -> None:
    from trainer.jobspec import ModelSpec
    from trainer.models import load_teacher
    from trainer.tiny import tiny_pipeline_dir

    folder = tiny_pipeline_dir("sd15", cache_root=roots["models"] / f"tiny-{tmp_path.name}")
    model = _created(client, auth, {**TINY_SPEC, "model": {"teacher": str(folder)}})["model"]
    assert model["teacher"] == os.path.realpath(folder)
    assert load_teacher(ModelSpec(**model)).family == "sd15"  # before the swap: loaded as checked
    _moved_out(folder, roots["outside"] / f"teacher-{tmp_path.name}")
    with pytest.raises(InputError, match=r"^model\.teacher: .* is not under the allowed model roots"):
        load_teacher(ModelSpec(**model))
    # Built-in teachers and hub ids name no local folder: allowed as at submit, with the same roots set.
    assert load_teacher(ModelSpec(teacher="tiny:sd15")).family == "sd15"


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": 2}))
    return folder


def _sam(path: Path) -> Path:
    import torch

    from trainer.discriminator import load_sam_image_encoder

    torch.save(load_sam_image_encoder("tiny", None).state_dict(), path)
    return path


def test_model_paths_swapped_after_submit_are_refused_where_the_trainer_opens_them(client, auth, roots, trainer_env,
                                                                                   tmp_path) -> None:
    """rl.init_from, rl.reward.path, distill.discriminator.checkpoint and eval.checkpoint: each is accepted at
    submit, opens before the swap, and after it fails naming the field, from the trainer's own opening code."""
    from inference.evaluate import checkpoints_to_score
    from trainer.discriminator import load_sam_image_encoder
    from trainer.hub import resolve_weights
    from trainer.rl_loop import resolve_init

    models, tag = roots["models"], tmp_path.name
    prompts = roots["data"] / f"eval-prompts-{tag}.txt"
    prompts.write_text("a handwritten digit two\n")
    reward = models / f"lrm-{tag}"
    reward.mkdir()
    cases = [  # field, the local thing it names, the spec that names it, where it is in the stored spec, opener
        ("rl.init_from", _checkpoint(models / f"init-{tag}"),
         lambda v: {**TINY_SPEC, "kind": "rl", "rl": {"init_from": v}}, lambda s: s["rl"]["init_from"],
         resolve_init),
        ("rl.reward.path", reward,
         lambda v: {**TINY_SPEC, "kind": "rl", "rl": {"reward": {"path": v}}}, lambda s: s["rl"]["reward"]["path"],
         lambda v: resolve_weights(v, "rl.reward.path", want="folder")),  # as rl_loop.build_reward opens it
        ("distill.discriminator.checkpoint", _sam(models / f"sam-{tag}.pth"),
         lambda v: {**TINY_SPEC, "distill": {"discriminator": {"backbone": "tiny", "checkpoint": v}}},
         lambda s: s["distill"]["discriminator"]["checkpoint"],
         lambda v: load_sam_image_encoder("tiny", v)),
        ("eval.checkpoint", _checkpoint(models / f"ckpt-{tag}"),
         lambda v: {"kind": "eval", "eval": {"protocol": "prompts", "prompts": str(prompts), "checkpoint": v,
                                             "scorers": [{"kind": "clip", "path": str(models / "clip")}]}},
         lambda s: s["eval"]["checkpoint"], lambda v: checkpoints_to_score(v, "latest")),
    ]
    for field, local, spec, stored_at, opener in cases:
        value = stored_at(_created(client, auth, spec(str(local))))
        assert value == os.path.realpath(local), field
        opener(value)  # before the swap: opens as checked
        _moved_out(local, roots["outside"] / f"{local.name}-moved")
        with pytest.raises(InputError, match=rf"^{field.replace('.', '[.]')}: .* is not under the allowed model roots"):
            opener(value)


def test_prepare_source_swapped_after_submit_is_refused_where_it_is_opened(client, auth, roots, trainer_env,
                                                                            tmp_path) -> None:
    from PIL import Image

    from trainer.sources import open_source

    image = roots["data"] / f"img-{tmp_path.name}.png"
    Image.new("RGB", (32, 32)).save(image)
    source = roots["data"] / f"source-{tmp_path.name}.jsonl"
    source.write_text(json.dumps({"image": str(image), "caption": "a digit"}) + "\n")
    spec = {"kind": "prepare", "model": {"teacher": "tiny:sdxl"}, "prepare": {"source": str(source)}}
    stored = _created(client, auth, spec)["prepare"]["source"]
    assert sum(len(s) for s in open_source(stored).shards) == 1  # before the swap: read as checked
    # Outside the roots: another user's manifest whose lines name images inside them (only the captions leak).
    _moved_out(source, roots["outside"] / f"source-{tmp_path.name}.jsonl")
    with pytest.raises(InputError, match=r"^prepare\.source: .* is not under the allowed data roots"):
        open_source(stored)


def test_one_path_check_shared_by_the_api_and_the_trainer_without_heavy_imports() -> None:
    code = ("import api.spec_paths, api.routes.generate, trainer.roots;"
            "assert api.spec_paths.under_roots is trainer.roots.under_root;"
            "assert api.routes.generate.under_root is trainer.roots.under_root")
    subprocess.run([sys.executable, "-c", code], check=True)
    light = "import sys, api.spec_paths, api.routes.generate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", light], check=True)
    roots_only = "import sys, trainer.roots; assert not [m for m in sys.modules if m.split('.')[0] == 'api']"
    subprocess.run([sys.executable, "-c", roots_only], check=True)
