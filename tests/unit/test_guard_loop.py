"""The collapse guard in the training loop (train.guard): health metrics at each validation, a `guard` event and a
stop with a checkpoint when a run collapses, and nothing on a healthy digits run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.errors import COLLAPSED, Collapsed
from trainer.jobspec import load_spec
from trainer.loop import train
from trainer.sink import JsonlSink

PRESETS = Path(__file__).resolve().parents[2] / "presets"


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _collapsing(make_cfg, run: Path, max_steps: int, action: str):  # noqa: ANN001, ANN202
    """A tiny run pushed to collapse, validated every step, and its sink. An AdamW step size of 1 (the spec's
    ceiling) throws the student's latents far out of the VAE's range within a few updates: the decoded grid blows
    out to the ends of [-1, 1] (saturation), which no healthy run does."""
    cfg = make_cfg(optim__generator__lr=1.0, optim__grad_clip=None, train__max_steps=max_steps, train__sample_every=1,
                   train__checkpoint_every=100, train__max_nonfinite=100,
                   train__guard={"enabled": True, "patience": 2, "action": action})
    return cfg, JsonlSink(run)


def test_an_absurd_learning_rate_trips_the_guard_and_stops_with_a_checkpoint(make_cfg, tmp_path):
    run = tmp_path / "run"
    cfg, sink = _collapsing(make_cfg, run, 12, "stop")
    with pytest.raises(Collapsed) as err:
        train(cfg, sink, run_dir=run)
    sink.close()
    events = _events(run)
    guard = [e for e in events if e["kind"] == "guard"]
    assert guard and guard[0]["data"]["action"] == "stop" and "collapse guard" in guard[0]["message"]
    stopped_at = guard[-1]["data"]["step"]
    failed = [e for e in events if e["kind"] == "failed"]
    assert failed and failed[-1]["data"]["code"] == COLLAPSED and str(err.value) in failed[-1]["message"]
    # The checkpoint of the step it stopped at is kept, to inspect or resume from.
    assert (run / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    assert stopped_at < 12
    health = [m for m in _metrics(run) if "health/saturation" in m.get("metrics", m)]
    assert len(health) >= 2  # one row per validation, the charts' data


def test_warn_only_records_the_event_and_runs_to_the_end(make_cfg, tmp_path):
    run = tmp_path / "run"
    cfg, sink = _collapsing(make_cfg, run, 6, "warn")
    assert train(cfg, sink, run_dir=run) == 6
    sink.close()
    kinds = [e["kind"] for e in _events(run)]
    assert "guard" in kinds and "failed" not in kinds and kinds[-1] == "finished"


@pytest.mark.slow
def test_a_healthy_digits_run_never_trips_the_guard(tmp_path):
    cfg = load_spec(PRESETS / "digits-4step.yaml")
    assert cfg.train.guard.enabled  # the preset turns it on
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "max_steps": 32, "sample_every": 8, "checkpoint_every": 1000, "log_every": 8})})
    run = tmp_path / "run"
    sink = JsonlSink(run)
    train(cfg, sink, run_dir=run)
    sink.close()
    assert [e for e in _events(run) if e["kind"] == "guard"] == []
    rows = [m for m in _metrics(run) if "health/diversity" in m.get("metrics", m)]
    assert len(rows) == 4
