"""trainer/roots.py: the one "path under root" check, and how a model field is judged where it is opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trainer.errors import InputError
from trainer.roots import MODEL_ENV, RUN_ROOT_ENV, opened_model, under_root


def test_under_root_compares_whole_components(tmp_path: Path) -> None:
    root = tmp_path / "models"
    assert under_root(str(root), [root]) and under_root(str(root / "a" / "b"), [str(root) + os.sep])
    assert not under_root(str(tmp_path / "models-other"), [root])
    assert not under_root(str(tmp_path), [root]) and not under_root(str(root), [])


@pytest.fixture
def models(tmp_path: Path, process_env) -> Path:
    root = tmp_path / "models"
    (root / "teacher").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    process_env.setenv(MODEL_ENV, f'["{root}"]')
    process_env.delenv(RUN_ROOT_ENV)
    return root


def test_builtins_hub_references_and_non_local_names_pass_unchanged(models: Path) -> None:
    for value in ("tiny:sdxl", "toy:digits", "org/name", "org/name/sam_vit_b.pth@main", "no-such-local-name"):
        assert opened_model(value, "model.teacher") == value


def test_a_local_model_path_is_opened_by_its_realpath_and_only_under_the_roots(models: Path, tmp_path: Path, process_env,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    link = models / "link"
    link.symlink_to(models / "teacher")
    assert opened_model(str(link), "model.teacher") == os.path.realpath(models / "teacher")
    (models / "escape").symlink_to(tmp_path / "outside")
    for value in (str(models / "escape"), str(tmp_path / "outside"), f"{models}/../outside"):
        with pytest.raises(InputError, match=r"^rl\.reward\.path: .* is not under the allowed model roots"):
            opened_model(value, "rl.reward.path")
    monkeypatch.chdir(tmp_path / "outside")  # a relative path that is no hub reference is a local one
    with pytest.raises(InputError, match=r"^distill\.discriminator\.checkpoint: "):
        opened_model("./sam.pth", "distill.discriminator.checkpoint")
    runs = tmp_path / "outside" / "jobs"
    process_env.setenv(RUN_ROOT_ENV, str(runs))  # run directories only where the field allows them
    (runs / "job_a" / "checkpoints").mkdir(parents=True)
    with pytest.raises(InputError):
        opened_model(str(runs / "job_a"), "model.teacher")
    assert opened_model(str(runs / "job_a"), "rl.init_from", runs_ok=True) == str(runs / "job_a")
    for value in (str(runs), str(runs / "job_a" / ".." / "job_b")):  # every job at once; `..` into another
        with pytest.raises(InputError, match=r"^rl\.init_from: "):
            opened_model(value, "rl.init_from", runs_ok=True)


def test_a_link_into_another_run_directory_is_refused_even_where_the_roots_cover_it(
        tmp_path: Path, process_env) -> None:
    """Submit stored /runs/job_a/... (the caller's own job); swapped for a link into job_b it no longer passes,
    though the model roots cover the whole storage root, as an operator may configure them."""
    runs = tmp_path / "storage" / "jobs"
    for job in ("job_a", "job_b"):
        (runs / job / "checkpoints" / "step-2").mkdir(parents=True)
    process_env.setenv(MODEL_ENV, str(tmp_path / "storage"))
    process_env.setenv(RUN_ROOT_ENV, str(runs))
    mine = runs / "job_a" / "checkpoints" / "step-2"
    assert opened_model(str(mine), "rl.init_from", runs_ok=True) == str(mine)
    assert opened_model(str(mine), "model.teacher") == str(mine)  # the roots cover it, and it is the named run's
    mine.rmdir()
    mine.symlink_to(runs / "job_b" / "checkpoints" / "step-2")
    for runs_ok in (True, False):
        with pytest.raises(InputError, match=r"^rl\.init_from: .* is not under the allowed model roots"):
            opened_model(str(mine), "rl.init_from", runs_ok=runs_ok)

def test_without_roots_a_trainer_run_by_hand_opens_what_it_is_given(tmp_path: Path, process_env) -> None:
    process_env.delenv(MODEL_ENV)
    assert opened_model(str(tmp_path), "model.teacher") == os.path.realpath(tmp_path)


def test_the_roots_come_from_the_process_entry_not_from_the_environment_at_open(tmp_path: Path, process_env,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.cli import configure_process
    from trainer.roots import Roots, installed_roots, parse_roots

    (tmp_path / "models").mkdir()
    env = {MODEL_ENV: f'["{tmp_path}/models"]', RUN_ROOT_ENV: str(tmp_path / "jobs"), "UNRELATED": "x"}
    roots = parse_roots(env)
    assert roots == Roots(data=None, model=(os.path.realpath(tmp_path / "models"),),
                          run_root=os.path.realpath(tmp_path / "jobs"))
    assert parse_roots({"FLASHDMD_ALLOWED_DATA_ROOTS": f"{tmp_path}/a,{tmp_path}/b"}).data == (
        os.path.realpath(tmp_path / "a"), os.path.realpath(tmp_path / "b"))
    configure_process(env)
    assert installed_roots() == roots
    with pytest.raises(InputError, match=r"^model\.teacher: "):
        opened_model(str(tmp_path), "model.teacher")
    # A variable changed after the entry ran widens nothing: only the entry reads the environment.
    monkeypatch.delenv(MODEL_ENV, raising=False)
    with pytest.raises(InputError, match=r"^model\.teacher: "):
        opened_model(str(tmp_path), "model.teacher")
    configure_process({})  # a trainer run by hand
    assert opened_model(str(tmp_path), "model.teacher") == os.path.realpath(tmp_path)
