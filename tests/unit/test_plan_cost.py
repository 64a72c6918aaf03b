"""The cost quote of `flashdmd plan` (trainer/plan_cost.py)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from trainer.errors import InputError
from trainer.jobspec import load_spec
from trainer.plan_cli import plan_command
from trainer.plan_cost import COSTS, quote


def test_quote_scales_with_steps_samples_and_price():
    spec = load_spec("presets/sdxl-4step.yaml")
    q = quote(spec, 1, "h200", 2.0)
    row = COSTS["h200"]
    assert q.seconds == pytest.approx(spec.train.max_steps * 64 * row.generator_turn_s)  # TTUR 1, 1 x 64
    assert q.cost == pytest.approx(q.gpu_hours * 2.0) and not q.estimate
    half = quote(load_spec("presets/sdxl-4step.yaml", ["train.max_steps=500"]), 1, "h200")
    assert half.seconds == pytest.approx(q.seconds / 2) and half.cost is None
    assert quote(spec, 1, "a100").estimate and quote(spec, 1, "a100").seconds > q.seconds
    with pytest.raises(InputError, match="--gpu-type"):
        quote(spec, 1, "tpu")


def test_every_row_has_a_source_and_a_date():
    for row in COSTS.values():
        assert row.source and len(row.date) == 10 and row.generator_turn_s > row.critic_turn_s > 0
    assert [k for k, r in COSTS.items() if not r.estimate] == ["h200"], "only the H200 was measured"


def test_plan_command_prints_the_quote():
    out = CliRunner().invoke(plan_command, ["presets/sdxl-4step.yaml", "--gpu-type", "h100",
                                            "--price-per-gpu-hour", "3"])
    assert out.exit_code == 0, out.output
    assert "expected time" in out.output and "(ESTIMATE)" in out.output and "expected cost" in out.output
    bad = CliRunner().invoke(plan_command, ["presets/sdxl-4step.yaml", "--gpu-type", "tpu"])
    assert bad.exit_code == 2 and "--gpu-type" in bad.output
