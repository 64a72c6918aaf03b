"""A checkpoint, a manifest line or a data file is reachable only through the
caller's own job or under an allowed root, after realpath, and the refusal never tells whether a file exists.

Each request is the one that broke, on Postgres and on SQLite.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest
from hardenkit import BACKENDS, Api, api_on, same_but
from servicekit import TINY_SPEC

from trainer.data import _image_folder, _manifest
from trainer.errors import InputError
from trainer.roots import ENV

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from trainer.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir("sdxl", cache_root=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", params=BACKENDS)
def api(request, database_url, roots, tmp_path_factory, redis_client):
    with api_on(request.param, pg_url=database_url, roots=roots, tmp=tmp_path_factory.mktemp("db")) as a:
        yield a


def _generate(api: Api, headers: dict[str, str], checkpoint: str):
    return api.client.post("/generate", json={"checkpoint": checkpoint, "prompt": "x", "seed": 1}, headers=headers)


def test_another_owners_checkpoint_by_path_is_refused_like_a_missing_one(api: Api, teacher, roots) -> None:
    a, b = api.token(), api.token()
    job = api.job_with_checkpoint(a, teacher)
    run_dir = api.settings.run_dir(job)
    link = roots["models"] / f"link-{secrets.token_hex(3)}"
    link.symlink_to(run_dir)  # a symlink under an allowed model root that leads into A's run directory
    (roots["outside"] / "exists").mkdir(exist_ok=True)
    if not (roots["outside"] / "lnk").is_symlink():
        (roots["outside"] / "lnk").symlink_to(roots["outside"] / "exists")
    probe = f"../../{roots['models'].name}/{link.name}"  # would land in a model root only if lnk is not a link
    attempts = [
        str(run_dir),  # the request that broke: B names A's run directory
        str(run_dir / "checkpoints" / "step-00000007"),
        f"{roots['models']}/../storage/jobs/{job}",  # `..` out of a model root into the run root
        f"{api.settings.run_root}/{job}/../{job}",
        str(link),  # a symlink escape
        str(link / "checkpoints" / "step-00000007"),
        str(api.settings.run_root),  # every job at once
        str(roots["outside"] / "exists"),  # exists, outside every root
        str(roots["outside"] / "missing"),  # does not exist
        f"{api.settings.run_root}/job_doesnotexist",
        "/root/.ssh/id_rsa",
        "../../etc/hostname",
        "relative/path",
        f"{roots['outside']}/lnk/{probe}",  # `..` after a symlink outside the roots...
        f"{roots['outside']}/nolink/{probe}",  # ...answers exactly like `..` after a plain missing folder
    ]
    bodies = []
    for path in attempts:
        res = _generate(api, b, path)
        assert res.status_code == 422, (path, res.text)
        bodies.append(res.json())
    # One answer for all of them: nothing tells B whether a path exists, or that A's job does.
    assert all(body == bodies[0] for body in bodies), bodies
    assert bodies[0]["error"]["code"] == "path_not_allowed" and bodies[0]["error"]["fields"] == ["checkpoint"]
    assert job not in json.dumps(bodies[0])

    # An operator who lists the storage root as a model root does not open other owners' runs to B.
    saved = api.client.app.state.settings  # type: ignore[attr-defined]
    wide = saved.model_copy(update={"allowed_model_roots": [*saved.allowed_model_roots, saved.storage_root]})
    api.client.app.state.settings = wide  # type: ignore[attr-defined]
    try:
        assert _generate(api, b, str(run_dir)).json() == bodies[0]
        spec = {"kind": "eval", "eval": {"protocol": "prompts", "checkpoint": str(run_dir),
                                         "prompts": str(roots["data"] / "p.txt"),
                                         "scorers": [{"kind": "clip", "path": str(roots["models"] / "clip")}]}}
        res = api.client.post("/jobs", json={"spec": spec}, headers=b)
        assert res.status_code == 422 and res.json()["error"]["fields"] == ["spec.eval.checkpoint"], res.text
    finally:
        api.client.app.state.settings = saved  # type: ignore[attr-defined]

    # A reaches its own checkpoint by path, and by the job id.
    own = _generate(api, a, str(run_dir))
    assert own.status_code == 200, own.text
    assert own.headers["x-checkpoint"] == f"{job}/step-00000007"
    assert api.client.post("/generate", json={"job": job, "prompt": "x"}, headers=b).status_code == 404


def _data_dir(roots: dict[str, Path]) -> Path:
    folder = roots["data"] / f"set-{secrets.token_hex(3)}"
    folder.mkdir()
    (folder / "ok.png").write_bytes(b"png")
    return folder


def _manifest_spec(folder: Path, *images: str) -> tuple[Path, dict]:
    path = folder / f"m-{secrets.token_hex(3)}.jsonl"
    path.write_text("".join(json.dumps({"image": im, "caption": "c"}) + "\n" for im in ("ok.png", *images)))
    return path, {**TINY_SPEC, "data": {"manifest": str(path)}}


@pytest.fixture(scope="module")
def outside(roots) -> dict[str, Path]:
    """Files outside the data roots: one that exists, one that does not, another user's sample image."""
    exists = roots["outside"] / "exists.png"
    exists.write_bytes(b"secret")
    sample = roots["storage"] / "jobs" / "job_someoneelse" / "samples" / "step-00000003.png"
    sample.parent.mkdir(parents=True, exist_ok=True)
    sample.write_bytes(b"their sample")
    return {"exists": exists, "missing": roots["outside"] / "missing.png", "sample": sample}


def test_manifest_lines_outside_the_data_roots_are_refused_naming_the_line(api: Api, roots, outside) -> None:
    owner = api.token()
    folder = _data_dir(roots)
    link = folder / "link.png"
    link.symlink_to(outside["exists"])
    bad = [
        str(outside["sample"]),  # the request that broke: another user's sample image
        "../../storage/jobs/job_someoneelse/samples/step-00000003.png",
        "/root/.ssh/id_rsa",
        "../../../../../../../../etc/hostname",
        str(outside["exists"]),
        str(outside["missing"]),
        "link.png",  # a symlink inside the root that leads out of it
    ]
    for image in bad:
        _, spec = _manifest_spec(folder, image)
        res = api.client.post("/jobs", json={"spec": spec}, headers=owner)
        assert res.status_code == 422, (image, res.text)
        err = res.json()["error"]
        assert err["code"] == "path_not_allowed" and err["fields"] == ["spec.data.manifest"], err
        assert "line 2:" in err["message"] and "not under the allowed data roots" in err["message"], err
    # An existing file and a missing one get the same answer but for the name the caller wrote.
    answers = {}
    for key in ("exists", "missing"):
        _, spec = _manifest_spec(folder, str(outside[key]))
        answers[key] = api.client.post("/jobs", json={"spec": spec}, headers=owner).json()
    assert same_but(answers["exists"], answers["missing"], lambda m: m.replace("missing.png", "exists.png"))
    path, _ = _manifest_spec(folder)
    path.write_text('{"image": "ok.png"}\nnot json\n')
    res = api.client.post("/jobs", json={"spec": {**TINY_SPEC, "data": {"manifest": str(path)}}}, headers=owner)
    assert res.status_code == 422 and "line 2:" in res.json()["error"]["message"], res.text
    _, good = _manifest_spec(folder, "ok.png", str(folder / "ok.png"))
    assert api.client.post("/jobs", json={"spec": good}, headers=owner).status_code == 201


def test_image_folder_links_outside_the_data_roots_are_refused(api: Api, roots, outside) -> None:
    owner = api.token()
    answers = {}
    for key in ("exists", "missing", "sample"):
        folder = _data_dir(roots)
        (folder / "sub").mkdir()
        (folder / "sub" / "x.png").symlink_to(outside[key])
        res = api.client.post("/jobs", json={"spec": {**TINY_SPEC, "data": {"images": str(folder)}}}, headers=owner)
        assert res.status_code == 422, res.text
        assert res.json()["error"]["fields"] == ["spec.data.images"]
        assert "'sub/x.png' is a link that is not under the allowed data roots" in res.json()["error"]["message"]
        answers[key] = json.loads(res.text.replace(str(folder), "<folder>"))
    assert answers["exists"] == answers["missing"] == answers["sample"]
    folder = _data_dir(roots)
    (folder / "inside.png").symlink_to(folder / "ok.png")  # links within the roots are fine
    res = api.client.post("/jobs", json={"spec": {**TINY_SPEC, "data": {"images": str(folder)}}}, headers=owner)
    assert res.status_code == 201, res.text


def test_the_trainer_checks_every_entry_again_at_load(roots, outside, process_env) -> None:
    """The worker's trainer gets FLASHDMD_ALLOWED_DATA_ROOTS (settings_env/the worker's env): a manifest edited
    after submit, or one too big to check at submit, is refused where it is loaded, naming the line."""
    folder = _data_dir(roots)
    process_env.setenv(ENV, str(roots["data"]))
    messages = {}
    for key in ("exists", "missing"):
        path, _ = _manifest_spec(folder, str(outside[key]))
        with pytest.raises(InputError) as info:
            _manifest(path)
        messages[key] = str(info.value).replace(path.name, "<m>")
        assert f"{path}:2: image" in str(info.value)
    assert messages["exists"] == messages["missing"].replace("missing.png", "exists.png")
    assert "not under the allowed data roots" in messages["exists"]
    (folder / "x.png").symlink_to(outside["sample"])
    with pytest.raises(InputError, match=r"data.images: x.png: image .* not under the allowed data roots"):
        _image_folder(folder)
    os.remove(folder / "x.png")
    assert [p.name for p, _ in _image_folder(folder)] == ["ok.png"]
    path, _ = _manifest_spec(folder, str(folder / "ok.png"))
    assert len(_manifest(path)) == 2
    process_env.delenv(ENV)  # a trainer run by hand (`flashdmd train`) has no roots to enforce
    path, _ = _manifest_spec(folder, str(outside["exists"]))
    assert len(_manifest(path)) == 2


@pytest.mark.slow
def test_a_manifest_edited_after_submit_fails_in_the_worker_naming_the_line(roots, outside, tmp_path) -> None:
    """The worker's trainer checks again at load: the manifest passed at submit, then a line was changed to
    point at another user's sample. The job fails with invalid_input naming the file and line, and the
    sample is never read."""
    from fastapi.testclient import TestClient
    from hardenkit import sqlite_url
    from servicekit import WorkerProcess, make_settings, queue_name, settings_env, wait_for

    from api.main import create_app

    settings = make_settings(sqlite_url(tmp_path), roots, broker_url=f"filesystem://{tmp_path / 'broker'}",
                             queue=queue_name("roots"))
    folder = _data_dir(roots)
    path, spec = _manifest_spec(folder, "ok.png")
    with TestClient(create_app(settings)) as client:
        owner = Api("sqlite", client, settings).token()
        res = client.post("/jobs", json={"spec": spec}, headers=owner)
        assert res.status_code == 201, res.text
        job_id = res.json()["id"]
        path.write_text(path.read_text() + json.dumps({"image": str(outside["sample"]), "caption": "c"}) + "\n")
        worker = WorkerProcess(settings_env(settings), tmp_path / "worker.log").start()
        try:
            def finished() -> dict | None:
                job = client.get(f"/jobs/{job_id}", headers=owner).json()
                return job if job["status"] in ("succeeded", "failed", "cancelled") else None

            job = wait_for(finished, 240, interval=1.0, what="the job to fail")
        finally:
            worker.stop()
    assert job["status"] == "failed" and job["error"]["code"] == "invalid_input", job
    assert f"data.manifest: {path}:3: image" in job["error"]["message"], job["error"]
    assert "not under the allowed data roots" in job["error"]["message"]


def test_a_cache_folder_the_trainer_would_write_is_refused(api: Api, roots) -> None:
    """memory.cache_dir is written by the trainer: over the API the cache stays in the job's own run dir."""
    owner = api.token()
    for where in (str(roots["outside"]), str(api.settings.data_dir), "/tmp/shared-cache"):
        spec = {**TINY_SPEC, "memory": {"text_cache": True, "cache_dir": where}}
        res = api.client.post("/jobs", json={"spec": spec}, headers=owner)
        assert res.status_code == 422, (where, res.text)
        assert res.json()["error"]["fields"] == ["spec.memory.cache_dir"], res.text
    res = api.client.post("/jobs", json={"spec": {**TINY_SPEC, "memory": {"text_cache": True}}}, headers=owner)
    assert res.status_code == 201, res.text
