"""Property-based fuzzing of every operation in the app's own OpenAPI schema.

Schemathesis generates requests (valid ones from the schema, and schema-violating ones) for each
operation; they are sent in-process to the app with a real token, and the `{job_id}` paths name a real job
that has events, metrics, checkpoints and a sample. The property: no response is a 5xx (nor an unhandled
exception), over at least MIN_REQUESTS requests per run.

No worker consumes the app's queue and FLASHDMD_MAX_TRAIN_STEPS is 10, so the jobs the fuzzer creates
never train. FLASHDMD_FUZZ_EXAMPLES (per operation and mode) and FLASHDMD_FUZZ_SEED tune a run.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import time
import traceback
from typing import Any

import pytest
import schemathesis  # the `test` extra
from appkit import App, dialect_app
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from servicekit import TINY_SPEC

from api.db import utcnow
from api.models import Checkpoint, Metric, Sample

pytestmark = [pytest.mark.service, pytest.mark.slow]

EXAMPLES = int(os.environ.get("FLASHDMD_FUZZ_EXAMPLES", "50"))
MIN_REQUESTS = 1000
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d4944415478da63f8cfc0f01f0005000201a5f1e1e80000000049454e44ae426082")


def _seed_job(app: App, headers: dict[str, str]) -> str:
    """A real job with something behind every sub-resource, so the generated requests reach the queries."""
    created = app.client.post("/jobs", json={"spec": {**TINY_SPEC, "train": {**TINY_SPEC["train"], "max_steps": 6}}},
                              headers=headers)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    run_dir = app.settings.run_dir(job_id)
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "samples" / "step-3.png").write_bytes(PNG)
    with app.sessions() as session:
        session.add_all([Metric(job_id=job_id, key=key, step=step, wall_time=float(step), value=step / 7)
                         for key in ("loss/dm", "loss/fake") for step in range(40)])
        session.add(Checkpoint(job_id=job_id, step=2, path="checkpoints/step-2", meta={}, created_at=utcnow()))
        session.add(Sample(job_id=job_id, step=3, path="samples/step-3.png", created_at=utcnow()))
        session.commit()
    return job_id


_NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63, 2.0, True, "2", None]))
_FIELDS = [("train", "max_steps"), ("train", "seed"), ("train", "batch_size"), ("train", "checkpoint_every"),
           ("train", "num_samples"), ("distill", "dm_weight"), ("distill", "fake_guidance"), ("distill", "ema"),
           ("schedule", "num_steps"), ("model", "resolution"), ("optim", "warmup_steps"), ("data", "num_workers")]


@st.composite
def _spliced_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec = json.loads(json.dumps(TINY_SPEC))
    spec["train"]["max_steps"] = draw(st.integers(1, 10))
    for section, field in draw(st.lists(st.sampled_from(_FIELDS), max_size=3, unique=True)):
        spec.setdefault(section, {})[field] = draw(_NUMBERS)
    if draw(st.booleans()):
        spec["model"]["teacher"] = draw(st.one_of(st.sampled_from(["tiny:sd15", "tiny:../../etc", "toy:digits"]),
                                                  st.text(max_size=20)))
    return {"spec": spec, "name": draw(st.one_of(st.none(), st.text(max_size=30)))}


def _send(app: App, kwargs: dict[str, Any]):
    """Send a generated request through our TestClient (bodies serialised here, as a hostile client would)."""
    headers = {k: v for k, v in (kwargs.get("headers") or {}).items() if k.lower() != "connection"}
    content = kwargs.get("data")
    if "json" in kwargs:
        content = json.dumps(kwargs["json"]).encode()
    return app.client.request(kwargs["method"], kwargs["url"], params=kwargs.get("params") or None,
                              headers=headers, content=content)


@pytest.fixture(params=["sqlite", "postgres"])
def app(request, database_url, roots, tmp_path) -> App:
    with dialect_app(request.param, database_url=database_url, roots=roots, tmp=tmp_path,
                     max_train_steps=10, max_active_jobs_per_owner=25) as built:
        yield built


def test_no_server_errors_over_the_openapi_schema(app: App) -> None:
    headers = app.token("fuzz")
    job_id = _seed_job(app, headers)
    schema = schemathesis.openapi.from_dict(app.client.app.openapi())  # type: ignore[attr-defined]
    run_seed = int(os.environ.get("FLASHDMD_FUZZ_SEED", secrets.randbits(32)))
    statuses: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    failures: list[str] = []
    started = time.monotonic()

    def record(label: str, case: Any) -> None:
        try:
            kwargs = case.as_transport_kwargs(base_url="http://testserver")
        except Exception:  # a case schemathesis itself cannot serialise is not a request
            return
        try:
            response = _send(app, kwargs)
        except (UnicodeEncodeError, ValueError, TypeError):
            return  # the HTTP client refused to send it (e.g. a non-ASCII header): nothing reached us
        except Exception:
            statuses[label][599] += 1
            failures.append(f"{label}: unhandled {traceback.format_exc(limit=-3)}\n{kwargs}")
            return
        statuses[label][response.status_code] += 1
        if response.status_code >= 500:
            failures.append(f"{label} -> {response.status_code} {response.text[:300]}\n{kwargs}")

    def fuzz(label: str, strategy: st.SearchStrategy[Any]) -> None:
        @seed(run_seed)
        @hypothesis_settings(max_examples=2 * EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                             suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case: Any) -> None:
            record(label, case)

        run()

    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.label == "GET /jobs/{job_id}/stream":
            # The seeded job stays queued, so its stream ends only when the client leaves, which an in-process
            # TestClient never does; tests/service/test_ui_stream.py covers its ownership, bounds and ending.
            continue
        fixed = {"job_id": job_id} if "{job_id}" in operation.path else {}
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        strategies = [operation.as_strategy(mode, path_parameters=fixed, headers=headers) for mode in modes]
        if fixed:  # any job id, too
            strategies += [operation.as_strategy(mode, headers=headers) for mode in modes]
        if operation.label == "POST /jobs":
            # Specs generated from the schema almost never pass the cross-field checks; these are the
            # valid tiny spec with hostile values spliced in, so the insert path is fuzzed as well.
            strategies.append(_spliced_specs().map(
                lambda body, op=operation: op.Case(body=body, headers=headers, media_type="application/json")))
        fuzz(operation.label, st.one_of(*strategies))

    total = sum(sum(c.values()) for c in statuses.values())
    report = "\n".join(f"{label:36s} {sum(c.values()):5d}  {dict(sorted(c.items()))}" for label, c in statuses.items())
    print(f"\n[{app.dialect}] seed {run_seed}: {total} requests in {time.monotonic() - started:.0f}s\n{report}")
    assert not failures, f"seed {run_seed}: {len(failures)} server errors:\n" + "\n\n".join(failures[:5])
    assert total >= MIN_REQUESTS, f"only {total} requests were generated"
