"""The `kind: prepare` spec: validation, and the service's path rules for prepare sources, outputs, caches."""

from __future__ import annotations

import pytest

from api.errors import APIError
from api.settings import Settings
from api.spec_paths import check_spec_paths
from trainer.jobspec import SpecError, num_processes, parse_spec, total_steps


def test_a_prepare_spec_validates_and_runs_as_one_process():
    cfg = parse_spec({"kind": "prepare", "model": {"teacher": "tiny:sdxl"},
                      "prepare": {"source": "/data/x", "buckets": {"enabled": True, "sizes": "sdxl"}}})
    assert (total_steps(cfg), num_processes(cfg)) == (1, 1)
    with pytest.raises(SpecError, match="prepare.buckets.crop"):
        parse_spec({"kind": "prepare", "model": {"teacher": "tiny:sdxl"},
                    "prepare": {"source": "/data/x", "buckets": {"crop": "diagonal"}}})


def test_the_service_checks_prepare_and_cache_paths(tmp_path):
    data = tmp_path / "data"
    (data / "shards").mkdir(parents=True)
    settings = Settings(data_dir=tmp_path / "svc", allowed_data_roots=[str(data)])
    ok = {"kind": "prepare", "model": {"teacher": "tiny:sdxl"}, "prepare": {"source": str(data / "shards")}}
    assert check_spec_paths(ok, settings=settings)["prepare"]["source"] == str(data / "shards")
    for prepare, field in (({"source": str(tmp_path / "elsewhere")}, "spec.prepare.source"),
                           ({"source": str(data / "shards"), "output": str(data / "c")}, "spec.prepare.output")):
        with pytest.raises(APIError) as err:
            check_spec_paths({**ok, "prepare": prepare}, settings=settings)
        assert err.value.fields == [field]
    own = settings.run_dir("job_mine") / "cache"
    train = {"kind": "distill", "data": {"cache": str(own)}}
    assert check_spec_paths(train, settings=settings, owns_job=lambda j: j == "job_mine")["data"]["cache"] == str(own)
    with pytest.raises(APIError):
        check_spec_paths({"kind": "distill", "data": {"cache": str(own)}}, settings=settings)
