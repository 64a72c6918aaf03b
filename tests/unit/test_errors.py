"""A failed job's error: one line, a stable code, the cause naming the spec field; and a hub id that cannot be
reached fails at once (no retries) with model_unreachable."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from trainer.errors import (
    INVALID_INPUT,
    MODEL_UNREACHABLE,
    OUT_OF_MEMORY,
    TRAINER_FAILED,
    Failure,
    InputError,
    ModelUnreachable,
    TrainingError,
    classify,
    from_log,
    job_error,
    one_line,
)
from trainer.hub import check_hub_model, resolve_weights

REPO = Path(__file__).resolve().parents[2]
TORCH_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
             "1.2 GiB is free. Of the allocated memory 70 GiB is allocated by PyTorch.\nIf reserved but unallocated "
             "memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


class OutOfMemoryError(RuntimeError):
    """torch.OutOfMemoryError's name and base: what the classifier keys on (no CUDA on this machine)."""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with ends: connecting is refused


def test_each_code_from_an_exception() -> None:
    assert classify(InputError("data.folder: no such folder: /x")) == Failure(INVALID_INPUT, "data.folder: no such folder: /x")
    unreachable = classify(ModelUnreachable("model.teacher: cannot reach huggingface.co", host="huggingface.co"))
    assert unreachable == Failure(MODEL_UNREACHABLE, "model.teacher: cannot reach huggingface.co")
    oom = classify(OutOfMemoryError(TORCH_OOM))
    assert oom == Failure(OUT_OF_MEMORY, "CUDA out of memory")
    assert classify(MemoryError()).code == OUT_OF_MEMORY
    crash = classify(TrainingError("3 consecutive steps with non-finite losses\nsee metrics"))
    assert crash == Failure(TRAINER_FAILED, "TrainingError: 3 consecutive steps with non-finite losses; see metrics")
    assert str(crash).startswith("trainer_failed: TrainingError: ")


def test_each_code_from_a_trainer_event() -> None:
    # Our codes pass through; an exception's class name (the training loop's record) maps onto them.
    assert job_error(MODEL_UNREACHABLE, "model.teacher: x") == Failure(MODEL_UNREACHABLE, "model.teacher: x")
    assert job_error(INVALID_INPUT, "a\nb") == Failure(INVALID_INPUT, "a; b")
    assert job_error("OutOfMemoryError", TORCH_OOM) == Failure(OUT_OF_MEMORY, "CUDA out of memory")
    assert job_error("RuntimeError", "NCCL timeout") == Failure(TRAINER_FAILED, "NCCL timeout")


def test_each_code_from_an_exit_and_a_log_tail() -> None:
    """A trainer that wrote no event: the last `error:` line, never the spec JSON or warnings above it."""
    tail = '  "seed": 0\n}\nUserWarning: something from the hub\nRetrying in 1s [Retry 1/5].\n' \
           "error: model.teacher: cannot load 'x'\n"
    assert from_log(2, tail, bad_input_exit=2) == Failure(INVALID_INPUT, "model.teacher: cannot load 'x'")
    assert from_log(2, "", bad_input_exit=2) == Failure(INVALID_INPUT, "the trainer rejected its input")
    spec_error = "error: invalid spec /r/spec.json:\n  train.max_steps: must be > 0\n  data: required\n"
    assert from_log(2, "W warn\n" + spec_error, bad_input_exit=2) == Failure(
        INVALID_INPUT, "invalid spec /r/spec.json: train.max_steps: must be > 0; data: required")
    traceback = "Traceback (most recent call last):\n  File x\ntorch.OutOfMemoryError: CUDA out of memory. Tried"
    assert from_log(1, traceback, bad_input_exit=2) == Failure(OUT_OF_MEMORY, "torch.OutOfMemoryError: CUDA out of memory")
    killed = from_log(-9, "step 3\n", bad_input_exit=2)
    assert killed.code == TRAINER_FAILED and killed.message.startswith("the trainer killed by signal 9 (SIGKILL")
    assert from_log(1, "ValueError: bad\n", bad_input_exit=2) == Failure(
        TRAINER_FAILED, "the trainer exited with code 1: ValueError: bad")


def test_one_line_caps_long_messages() -> None:
    line = one_line("x" * 2000 + "\n" + "y")
    assert "\n" not in line and len(line) == 500 and line.endswith("…")


def test_an_unreachable_hub_fails_at_once_naming_the_field_and_host(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(ModelUnreachable, match=r"^model\.teacher: cannot resolve hub id 'someorg/not-a-model': "
                                                r"cannot connect to 127\.0\.0\.1:\d+") as err:
        check_hub_model("someorg/not-a-model", "model.teacher")
    assert err.value.host == "127.0.0.1"
    with pytest.raises(ModelUnreachable, match=r"^rl\.reward\.path: .*cannot connect"):
        resolve_weights("org/lrm", "rl.reward.path", want="folder")
    assert time.monotonic() - start < 10  # no retries with backoff
    assert check_hub_model("tiny:sdxl", "model.teacher") is False  # not a hub id: nothing to check


def test_a_trainer_run_with_an_unreachable_teacher_ends_fast_with_one_line(tmp_path) -> None:
    """`model.teacher: someorg/not-a-model` under HF_HUB_OFFLINE=1: exit 2 within seconds of start-up, and a
    `failed` event whose code and one-line message the service shows as the job's error."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"kind": "distill", "model": {"teacher": "someorg/not-a-model"},
                                    "data": {"builtin": "digits"}, "train": {"max_steps": 1, "batch_size": 2,
                                                                             "mixed_precision": "no"},
                                    "distill": {"discriminator": {"backbone": "tiny"}}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "flashjob", str(spec), "--run-dir", str(run_dir)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Retrying" not in out.stderr
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    failed = [e for e in events if e["kind"] == "failed"]
    assert len(failed) == 1, events
    data = failed[0]["data"]
    assert data["code"] == MODEL_UNREACHABLE and "\n" not in data["message"]
    assert data["message"].startswith("model.teacher: cannot resolve hub id 'someorg/not-a-model': HF_HUB_OFFLINE")
    assert job_error(data["code"], data["message"]) == Failure(MODEL_UNREACHABLE, data["message"])


def test_an_out_of_memory_error_carries_the_plan_figure() -> None:
    """The runner adds `flashdmd plan`'s figure when it is cheap (a local or cached teacher), nothing otherwise."""
    from api.runner import plan_note
    from trainer.jobspec import parse_spec

    spec = parse_spec({"kind": "distill", "model": {"teacher": "tiny:sdxl"}, "data": {"builtin": "digits"},
                       "distill": {"discriminator": {"backbone": "tiny"}}})
    note = plan_note(spec)
    assert note.startswith(" (`flashdmd plan` predicts ") and "GiB per GPU on 1 GPU(s)" in note, note
    hub = parse_spec({"kind": "distill", "model": {"teacher": "someorg/not-cached"}, "data": {"builtin": "digits"}})
    assert plan_note(hub) == ""
