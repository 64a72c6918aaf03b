"""presets/digits-4step.yaml is the demo's recipe: one source, valid under the real spec loader, and exactly what
`flashdmd demo` submits; presets/README.md lists every preset."""

from __future__ import annotations

import json
from pathlib import Path

from flashjob.demo import DEMO_PRESET, DEMO_SPEC
from trainer.jobspec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_preset_validates_and_is_what_the_demo_submits() -> None:
    assert DEMO_PRESET == REPO / "presets" / "digits-4step.yaml"
    loaded = load_spec(DEMO_PRESET)  # the loader `flashdmd train` and the service use
    submitted = json.loads(json.dumps(DEMO_SPEC))  # run_demo's copy, before --quick/--steps
    assert loaded.model_dump(mode="json") == parse_spec(submitted).model_dump(mode="json")
    assert (loaded.kind, loaded.model.teacher, loaded.schedule.num_steps) == ("distill", "toy:digits", 4)
    assert loaded.train.max_steps == 400 and loaded.distill.ema == 0.0 and loaded.optim.generator.lr == 1e-5


def test_the_presets_readme_lists_every_preset_once() -> None:
    text = (REPO / "presets" / "README.md").read_text()
    for preset in sorted((REPO / "presets").glob("*.yaml")):
        assert text.count(f"`{preset.name}`") == 1, preset.name
