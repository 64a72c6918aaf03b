"""`flashdmd plan --trace` (trainer/trace.py): the real iteration traced on fake tensors, and its trackers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20


def _run(*args: str, env: dict[str, str] | None = None) -> dict:
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_spec(tiny_dir, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("spec")
    spec = (REPO / "presets/tiny-sdxl.yaml").read_text().replace("teacher: tiny:sdxl", f"teacher: {tiny_dir('sdxl')}")
    (folder / "tiny.yaml").write_text(spec)
    return str(folder / "tiny.yaml")


def test_the_trace_runs_every_phase_and_sees_a_planted_allocation(tiny_spec):
    base = _run("trainer.trace", tiny_spec)
    assert set(base["phase_peaks"]) >= {"generator phase", "fake-score phase", "discriminator phase"}
    cat = base["by_category"]
    assert cat["Parameter"] > 0 and cat["Optstate"] > 0 and cat["Activation"] > 0
    # the analytic plan of the same spec agrees with the traced peak (fp32 graphs, VAE decode, SAM, kept tensors)
    from trainer.plan import make_plan
    from trainer.spec import load_spec

    planned = make_plan(load_spec(tiny_spec)).total()
    assert abs(planned / base["peak_bytes"] - 1) < 0.05
    planted = _run("trainer.trace", tiny_spec, env={"FLASHDMD_TRACE_PLANT_MIB": "64"})
    # a 64 MiB buffer the generator keeps from its first forward on: the peak moves by exactly that
    assert planted["peak_bytes"] - base["peak_bytes"] == 64 * MIB


def test_tracker_correction_pins_the_optimiser_state_of_a_sharded_stack():
    # torch's FSDPMemTracker, states created inside the step: temporaries are tagged as state
    raw = _run("trainer.trace_check", "--tracker", "fsdp", "--fresh")
    want = raw["expected"]["optim"]  # 2 x params x 4 B / 8 + AdamW's step tensors
    assert raw["measured"]["optim_at_peak"] > 3 * want
    for tracker in ("fsdp-corrected", "peak"):  # the trace's way: primed states, step allocations as temporaries
        got = _run("trainer.trace_check", "--tracker", tracker)
        assert got["measured"]["optim_at_peak"] == want == got["measured"]["optim_held"]
        assert got["measured"]["params"] == got["expected"]["params"]
        assert got["measured"]["grads_after_step"] == got["expected"]["grads"]


def test_a_ddp_trace_counts_the_reducers_gradient_buckets(tiny_spec):
    # rank 0 of a fake group of 2: every trainable net is DDP-wrapped, and its Reducer's buckets (allocated in C++
    # before the tracker starts) are counted from the wrapped parameters, as the plan counts them from the config
    from trainer.plan import make_plan
    from trainer.spec import load_spec

    got = _run("trainer.trace", tiny_spec, "--gpus", "2")
    buckets = got["by_category"]["DDP gradient buckets (counted)"]
    planned = sum(v for k, v in make_plan(load_spec(tiny_spec), gpus=2).figures().items() if "DDP gradient buckets" in k)
    assert buckets == planned > 0
    assert any("DDP gradient buckets" in n for n in got["notes"])
