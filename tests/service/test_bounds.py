"""Every bad value gets a clean 4xx naming the field, on Postgres and SQLite.

Each case is a request an attacker or a careless user sent (the ones that broke are marked "broke:"), grouped
by bad-input class; `BAD_INPUTS` is also what the closing report's table counts.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from appkit import DIALECTS, App, dialect_app
from servicekit import TINY_SPEC
from sqlalchemy import select

from api.models import Job

pytestmark = pytest.mark.service

INF, NAN = float("inf"), float("nan")


def spec(**sections: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(TINY_SPEC)
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def rl_spec(**rl: Any) -> dict[str, Any]:
    return {**spec(), "kind": "rl", "schedule": {"num_steps": 4}, "rl": rl}


def eval_spec(**values: Any) -> dict[str, Any]:
    return {"kind": "eval", "eval": {"checkpoint": "/nonexistent", **values}}


# (class, spec, the field the error must name)
SPEC_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("big-int-in-spec", spec(train={"max_steps": 10**20}), "spec.train.max_steps"),  # broke: 500
    ("big-int-in-spec", spec(train={"max_steps": 2**31}), "spec.train.max_steps"),  # broke: 500 on Postgres (int4)
    ("big-int-in-spec", spec(train={"max_steps": 2**63}), "spec.train.max_steps"),
    ("big-int-in-spec", spec(train={"max_steps": -(10**30)}), "spec.train.max_steps"),
    ("big-int-in-spec", spec(train={"checkpoint_every": 10**30}), "spec.train.checkpoint_every"),
    ("big-int-in-spec", spec(train={"sample_every": 2**64}), "spec.train.sample_every"),
    ("big-int-in-spec", spec(train={"keep_last": 10**19}), "spec.train.keep_last"),
    ("big-int-in-spec", spec(train={"log_every": 2**40}), "spec.train.log_every"),
    ("big-int-in-spec", spec(optim={"warmup_steps": 10**19}), "spec.optim.warmup_steps"),
    ("big-int-in-spec", spec(data={"num_workers": 10**30}), "spec.data.num_workers"),
    ("big-int-in-spec", spec(distill={"discriminator": {"backbone": "tiny", "head_channels": 10**12}}),
     "spec.distill.discriminator.head_channels"),
    ("big-int-in-spec", spec(distill={"discriminator": {"backbone": "tiny", "img_size": 10**9}}),
     "spec.distill.discriminator.img_size"),
    ("big-int-in-spec", eval_spec(steps=[10**30]), "spec.eval.steps"),
    ("big-int-in-spec", eval_spec(max_prompts=10**30), "spec.eval.max_prompts"),
    ("non-finite-float", spec(distill={"dm_weight": INF}), "spec.distill.dm_weight"),  # broke: 500 / malformed JSON
    ("non-finite-float", spec(distill={"fake_guidance": INF}), "spec.distill.fake_guidance"),  # broke
    ("non-finite-float", spec(distill={"real_guidance": NAN}), "spec.distill.real_guidance"),
    ("non-finite-float", spec(distill={"gan_weight": -INF}), "spec.distill.gan_weight"),
    ("non-finite-float", spec(optim={"generator": {"lr": NAN}}), "spec.optim.generator.lr"),
    ("non-finite-float", spec(optim={"fake_score": {"betas": [0.9, INF]}}), "spec.optim.fake_score.betas"),
    ("non-finite-float", spec(optim={"grad_clip": INF}), "spec.optim.grad_clip"),
    ("non-finite-float", spec(schedule={"shift": INF}), "spec.schedule.shift"),
    ("non-finite-float", spec(model={"teacher": "tiny:sdxl", "lora": {"alpha": INF}}), "spec.model.lora.alpha"),
    ("non-finite-float", rl_spec(beta=INF), "spec.rl.beta"),
    ("non-finite-float", eval_spec(guidance=NAN), "spec.eval.guidance"),
    ("coerced-type", spec(train={"batch_size": "2"}), "spec.train.batch_size"),  # broke: coerced to 2
    ("coerced-type", spec(train={"batch_size": True}), "spec.train.batch_size"),  # broke: coerced to 1
    ("coerced-type", spec(train={"batch_size": 2.0}), "spec.train.batch_size"),
    ("coerced-type", spec(train={"max_steps": "6"}), "spec.train.max_steps"),
    ("coerced-type", spec(train={"gradient_checkpointing": "true"}), "spec.train.gradient_checkpointing"),
    ("coerced-type", spec(train={"gradient_checkpointing": 1}), "spec.train.gradient_checkpointing"),
    ("coerced-type", spec(distill={"dm_weight": "1.0"}), "spec.distill.dm_weight"),
    ("coerced-type", spec(model={"teacher": 5}), "spec.model.teacher"),
    ("coerced-type", spec(data={"center_crop": "no"}), "spec.data.center_crop"),
    ("coerced-type", rl_spec(joint=0), "spec.rl.joint"),
    ("coerced-type", eval_spec(per_class="100"), "spec.eval.per_class"),
    ("worker-only-check", spec(train={"seed": 10**30}), "spec.train.seed"),  # broke: traceback in the worker
    ("worker-only-check", spec(train={"seed": 2**32}), "spec.train.seed"),
    ("worker-only-check", spec(train={"seed": -1}), "spec.train.seed"),
    ("worker-only-check", eval_spec(seed=2**63), "spec.eval.seed"),
    ("worker-only-check", spec(model={"teacher": "tiny:sdxl", "resolution": 17}), "spec.model.resolution"),  # broke
    ("worker-only-check", spec(model={"teacher": "tiny:sdxl", "resolution": 4104}), "spec.model.resolution"),
    ("worker-only-check", spec(model={"teacher": "tiny:sdxl", "resolution": 8}), "spec.model.resolution"),
    ("worker-only-check", spec(model={"teacher": "tiny:../../etc"}), "spec.model.teacher"),  # broke
    ("worker-only-check", spec(model={"teacher": "toy:../../etc/passwd"}), "spec.model.teacher"),
    ("worker-only-check", spec(model={"teacher": "tiny:"}), "spec.model.teacher"),
    ("worker-only-check", spec(model={"teacher": "tiny:sdxl/../sd15"}), "spec.model.teacher"),
    ("worker-only-check", spec(distill={"discriminator": {"backbone": "tiny", "blocks": [4]}}),
     "spec.distill.discriminator"),
    ("worker-only-check", spec(distill={"discriminator": {"backbone": "tiny", "blocks": [-1]}}),
     "spec.distill.discriminator"),
    ("worker-only-check", rl_spec(reward={"kind": "pixel", "scorer": "nope"}), "spec.rl.reward"),
    ("unstorable-text", spec(model={"teacher": "tiny:sdxl\x00"}), "spec.model.teacher"),
    ("unstorable-text", spec(name="a\x00b"), "spec.name"),
    ("unstorable-text", spec(name="\ud800"), "spec.name"),
    ("unstorable-text", spec(model={"teacher": "tiny:sdxl", "lora": {"target_modules": ["to_q\x00"]}}),
     "spec.model.lora.target_modules"),
    ("unstorable-text", eval_spec(scorers=[{"kind": "clip", "path": "/m\x00"}]), "spec.eval.scorers.0.path"),
]


@pytest.fixture(scope="module", params=DIALECTS)
def app(request, database_url, roots, tmp_path_factory) -> App:
    # The cap is the database's limit here, so that the spec's own bounds are what these tests see.
    with dialect_app(request.param, database_url=database_url, roots=roots, tmp=tmp_path_factory.mktemp("bounds"),
                     max_train_steps=2**31 - 1, max_active_jobs_per_owner=0) as built:
        yield built


@pytest.fixture(scope="module")
def owner(app: App) -> dict[str, str]:
    return app.token()


@pytest.fixture(scope="module")
def job_id(app: App, owner: dict[str, str]) -> str:
    created = app.post_json("/jobs", {"spec": TINY_SPEC}, owner)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def assert_names(response, field: str, status: int = 422) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    # The field itself, or an item of it (`betas.1`, `steps.0`).
    assert any(f == field or f.startswith(field + ".") for f in error.get("fields", [])), error
    assert field in error["message"], error


@pytest.mark.parametrize("kind,body,field", SPEC_CASES, ids=[f"{k}:{f}:{i}" for i, (k, _, f) in enumerate(SPEC_CASES)])
def test_bad_spec_value_is_a_422_naming_the_field(app: App, owner, kind: str, body: dict, field: str) -> None:
    response = app.post_json("/jobs", {"spec": body}, owner)
    assert_names(response, field)


def test_job_name_with_nul_or_surrogate(app: App, owner) -> None:
    for name in ("a\x00", "\udfff"):
        assert_names(app.post_json("/jobs", {"spec": TINY_SPEC, "name": name}, owner), "name")


def test_raw_json_infinity_literal(app: App, owner) -> None:
    """The literal JSON text that broke (Python's json reads `Infinity`, so the API must refuse it itself)."""
    text = ('{"spec": {"kind": "distill", "model": {"teacher": "tiny:sdxl"}, "data": {"builtin": "digits"}, '
            '"distill": {"dm_weight": Infinity, "discriminator": {"backbone": "tiny"}}}}')
    response = app.client.post("/jobs", content=text, headers={**owner, "Content-Type": "application/json"})
    assert_names(response, "spec.distill.dm_weight")


def test_the_largest_values_that_fit_are_stored(app: App, owner) -> None:
    """2^31 - 1 steps fits the 32-bit total_steps column on Postgres, and the seed bound is inclusive."""
    body = spec(train={"max_steps": 2**31 - 1, "seed": 2**32 - 1})
    created = app.post_json("/jobs", {"spec": body}, owner)
    assert created.status_code == 201, created.text
    job = app.client.get(f"/jobs/{created.json()['id']}", headers=owner).json()
    assert job["progress"]["total_steps"] == 2**31 - 1 and job["spec"]["train"]["seed"] == 2**32 - 1
    with app.sessions() as session:
        assert session.scalar(select(Job.total_steps).where(Job.id == job["id"])) == 2**31 - 1


# (class, path under /jobs/{id}, query, field)
QUERY_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("big-int-in-query", "/events", {"after": 2**63}, "after"),  # broke: 500
    ("big-int-in-query", "/events", {"after": 10**30}, "after"),
    ("big-int-in-query", "/events", {"after": -1}, "after"),
    ("big-int-in-query", "/events", {"limit": 10**30}, "limit"),
    ("big-int-in-query", "/metrics", {"since_step": 10**30}, "since_step"),  # broke
    ("big-int-in-query", "/metrics", {"since_step": -(10**30)}, "since_step"),  # broke
    ("big-int-in-query", "/metrics", {"since_step": 2**31}, "since_step"),
    ("big-int-in-query", "/metrics", {"stride": 2**63}, "stride"),
    ("big-int-in-query", "/metrics", {"limit": -(2**63) - 1}, "limit"),
    ("unstorable-text", "/metrics", {"key": "loss\x00"}, "key"),
    ("unstorable-text", "/metrics", {"key": "k" * 129}, "key"),
]


@pytest.mark.parametrize("kind,path,query,field", QUERY_CASES,
                         ids=[f"{k}:{p}:{f}:{i}" for i, (k, p, _, f) in enumerate(QUERY_CASES)])
def test_bad_query_value_is_a_422_naming_it(app: App, owner, job_id: str, kind, path, query, field) -> None:
    assert_names(app.client.get(f"/jobs/{job_id}{path}", params=query, headers=owner), field)


def test_bad_path_and_list_values(app: App, owner, job_id: str) -> None:
    for step in (10**30, 2**63, 2**31, -1):  # broke: samples/10^30 was a 500
        assert_names(app.client.get(f"/jobs/{job_id}/samples/{step}", headers=owner), "step")
    assert app.client.get(f"/jobs/{job_id}/samples/{2**31 - 1}", headers=owner).status_code == 404
    assert_names(app.client.get("/jobs", params={"after": "job_\x00"}, headers=owner), "after")
    assert_names(app.client.get("/jobs", params={"limit": 10**30}, headers=owner), "limit")
    # A job id Postgres cannot compare is simply not found, exactly like any other unknown id.
    missing = app.client.get("/jobs/job_doesnotexist", headers=owner).json()
    for bad in ("job_%00", "x" * 5000):
        response = app.client.get(f"/jobs/{bad}", headers=owner)
        assert response.status_code == 404 and response.json() == missing
    assert_names(app.client.post("/jobs", json={"spec": TINY_SPEC}, headers={**owner, "Idempotency-Key": "a\tb"}),
                 "Idempotency-Key")


def test_post_jobs_schema_describes_the_job_models(app: App) -> None:
    """The OpenAPI body of POST /jobs is the real spec, so clients can be generated from it."""
    schema = app.client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    spec = components["JobCreate"]["properties"]["spec"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in spec["oneOf"]} == {"DistillJob", "RLJob", "EvalJob", "PrepareJob"}
    assert spec["discriminator"]["propertyName"] == "kind"
    train = components["TrainSpec"]["properties"]
    assert train["max_steps"]["maximum"] == 2**31 - 1 and train["seed"]["maximum"] == 2**32 - 1
    assert train["batch_size"]["type"] == "integer"
    assert components["ModelSpec"]["properties"]["resolution"]["anyOf"][0]["multipleOf"] == 8
    assert components["DistillJob"]["additionalProperties"] is False
    params = {p["name"]: p["schema"] for p in schema["paths"]["/jobs/{job_id}/events"]["get"]["parameters"]}
    assert params["after"]["maximum"] == 2**63 - 1


def test_spec_must_be_a_mapping(app: App, owner) -> None:
    for bad in ([TINY_SPEC], "tiny:sdxl", 3, None):
        assert_names(app.post_json("/jobs", {"spec": bad}, owner), "spec")
