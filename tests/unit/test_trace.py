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
def tiny_preset(tiny_dir, tmp_path_factory):
    """tiny_preset("sd3") -> the path of presets/tiny-sd3.yaml with its teacher in this session's tiny folder."""
    folder = tmp_path_factory.mktemp("spec")

    def write(family: str) -> str:
        spec = (REPO / f"presets/tiny-{family}.yaml").read_text()
        spec = spec.replace(f"teacher: tiny:{family}", f"teacher: {tiny_dir(family)}")
        (folder / f"tiny-{family}.yaml").write_text(spec)
        return str(folder / f"tiny-{family}.yaml")

    return write


@pytest.fixture(scope="module")
def tiny_spec(tiny_preset) -> str:
    return tiny_preset("sdxl")


@pytest.fixture(scope="module")
def base_trace(tiny_preset):
    """base_trace("sdxl") -> the trace of the tiny preset as it stands, traced once per module (its tests share it)."""
    done: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in done:
            done[family] = _run("trainer.trace", tiny_preset(family))
        return done[family]

    return get


def test_the_trace_runs_every_phase_and_sees_a_planted_allocation(tiny_spec, base_trace):
    base = base_trace("sdxl")
    assert set(base["phase_peaks"]) >= {"generator phase", "fake-score phase", "discriminator phase"}
    cat = base["by_category"]
    assert cat["Parameter"] > 0 and cat["Optstate"] > 0 and cat["Activation"] > 0
    planted = _run("trainer.trace", tiny_spec, env={"FLASHDMD_TRACE_PLANT_MIB": "64"})
    # a 64 MiB buffer the generator keeps from its first forward on: the peak moves by exactly that
    assert planted["peak_bytes"] - base["peak_bytes"] == 64 * MIB


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_the_plan_agrees_with_the_trace_of_a_tiny_preset(family, tiny_preset, base_trace):
    # the analytic plan of the same spec within 5% of the traced peak (fp32 graphs, VAE decode, SAM, kept
    # tensors). tiny-sd3: at 32² its 64 image tokens join 333 text tokens in every joint block, which the MMDiT
    # estimate counts (trainer/plan_act.py: mmdit_graph_bytes); it planned -16% when only image tokens counted
    from trainer.jobspec import load_spec
    from trainer.plan import make_plan

    traced = base_trace(family)["peak_bytes"]
    planned = make_plan(load_spec(tiny_preset(family))).total()
    assert abs(planned / traced - 1) < 0.05, (planned / 2**20, traced / 2**20)


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
    from trainer.jobspec import load_spec
    from trainer.plan import make_plan

    got = _run("trainer.trace", tiny_spec, "--gpus", "2")
    buckets = got["by_category"]["DDP gradient buckets (counted)"]
    planned = sum(v for k, v in make_plan(load_spec(tiny_spec), gpus=2).figures().items() if "DDP gradient buckets" in k)
    assert buckets == planned > 0
    assert any("DDP gradient buckets" in n for n in got["notes"])
