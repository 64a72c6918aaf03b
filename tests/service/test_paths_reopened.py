"""Finding 6: a data file swapped for a symlink after submit was read from outside the data roots.

Every spec field that names a file is checked at submit by the API and again, after realpath, where the
trainer opens it, with the roots the worker passes down (api/runner.py roots_env) and the one shared
"path under root" function (trainer/roots.py under_root)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from servicekit import TINY_SPEC

from api.runner import roots_env
from trainer.config import DataSpec
from trainer.data import build_dataset
from trainer.errors import InputError

pytestmark = pytest.mark.service
SECRET = "another user's prompt\n"


@pytest.fixture
def trainer_env(settings, monkeypatch):
    """The environment the worker spawns the trainer with."""
    for key, value in roots_env(settings).items():
        monkeypatch.setenv(key, value)


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


def test_one_path_check_shared_by_the_api_and_the_trainer_without_heavy_imports() -> None:
    code = ("import api.spec_paths, api.routes.generate, trainer.roots;"
            "assert api.spec_paths.under_roots is trainer.roots.under_root;"
            "assert api.routes.generate.under_root is trainer.roots.under_root")
    subprocess.run([sys.executable, "-c", code], check=True)
    light = "import sys, api.spec_paths, api.routes.generate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", light], check=True)
    roots_only = "import sys, trainer.roots; assert not [m for m in sys.modules if m.split('.')[0] == 'api']"
    subprocess.run([sys.executable, "-c", roots_only], check=True)
