"""Unit tests for trainer/jobspec/ (the pydantic job spec) and the `python -m trainer` CLI front."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainer.jobspec import SpecError, apply_overrides, default_timesteps, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "presets").glob("*.yaml"))


def minimal(**sections: dict[str, Any]) -> dict[str, Any]:
    """The smallest valid spec, with `sections` merged one level deep."""
    raw: dict[str, Any] = {"model": {"teacher": "tiny:sd15"}, "data": {"builtin": "digits"}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def spec_error(raw: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

def test_presets_exist() -> None:
    assert len(PRESETS) >= 5


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_loads_and_round_trips(path: Path) -> None:
    cfg = load_spec(path)
    assert cfg.kind in ("distill", "rl", "eval")
    assert cfg.name in (None, path.stem)
    if cfg.kind != "eval":
        assert len(cfg.schedule.timesteps) == cfg.schedule.num_steps
    # The resolved JSON (what --dry-run prints and config.json stores) is itself a valid spec
    # that resolves to the same config.
    dumped = cfg.model_dump(mode="json")
    assert parse_spec(json.loads(json.dumps(dumped))).model_dump(mode="json") == dumped


# ---------------------------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------------------------

def test_default_schedule_k4() -> None:
    # DMD2: range(999, 0, -250) = [999, 749, 499, 249]; DM on all but the last, GAN on the last.
    s = parse_spec(minimal()).schedule
    assert s.num_steps == 4
    assert s.timesteps == [999, 749, 499, 249]
    assert s.dm_steps == [999, 749, 499]
    assert s.gan_steps == [249]


def test_default_schedule_k8() -> None:
    # range(999, 0, -125) = 999, 874, 749, 624, 499, 374, 249, 124
    s = parse_spec(minimal(schedule={"num_steps": 8})).schedule
    assert s.timesteps == [999, 874, 749, 624, 499, 374, 249, 124]
    assert s.dm_steps == [999, 874, 749, 624, 499, 374, 249]
    assert s.gan_steps == [124]


@pytest.mark.parametrize(("k", "expected"), [
    (1, [999]),                # stride 1000
    (2, [999, 499]),           # stride 500
    (3, [999, 666, 333]),      # stride 333
    (7, [999, 857, 715, 573, 431, 289, 147]),  # stride 142; range also yields 5, cut to K entries
])
def test_default_timesteps_other_k(k: int, expected: list[int]) -> None:
    assert default_timesteps(k) == expected


def test_single_step_schedule_uses_the_step_for_both() -> None:
    s = parse_spec(minimal(schedule={"num_steps": 1})).schedule
    assert (s.timesteps, s.dm_steps, s.gan_steps) == ([999], [999], [999])


def test_explicit_schedule_kept() -> None:
    s = parse_spec(minimal(schedule={"num_steps": 2, "timesteps": [999, 399]})).schedule
    assert (s.timesteps, s.dm_steps, s.gan_steps) == ([999, 399], [999], [399])


def test_flash_defaults() -> None:
    d = parse_spec(minimal()).distill
    assert d.mode == "flash"
    assert d.ttur == 1
    assert d.ema == 0.98
    assert d.gan_loss == "hinge"
    assert d.disc_weight == 1.0
    assert d.gan_weight == 5e-3
    assert (d.dm_min, d.dm_max) == (0.02, 0.98)


def test_dmd2_defaults() -> None:
    d = parse_spec(minimal(distill={"mode": "dmd2"})).distill
    assert d.ttur == 5
    assert d.ema == 0.0
    assert d.gan_loss == "logistic"
    assert d.disc_weight == 0.01
    assert d.gan_weight == 5e-3


def test_explicit_values_beat_mode_defaults() -> None:
    d = parse_spec(minimal(distill={"mode": "dmd2", "ttur": 2, "gan_loss": "hinge", "disc_weight": 1.0,
                                    "ema": 0})).distill
    assert (d.ttur, d.gan_loss, d.disc_weight, d.ema) == (2, "hinge", 1.0, 0.0)
    f = parse_spec(minimal(distill={"ttur": 2, "ema": 0.0, "gan_loss": "logistic"})).distill
    assert (f.ttur, f.ema, f.gan_loss) == (2, 0.0, "logistic")


@pytest.mark.parametrize(("backbone", "blocks", "img"), [
    ("vit_b", [2, 5, 8, 11], 1024),
    ("vit_l", [5, 11, 17, 23], 1024),
    ("vit_h", [7, 15, 23, 31], 1024),
    ("tiny", [1, 3], 64),
])
def test_discriminator_default_blocks(backbone: str, blocks: list[int], img: int) -> None:
    disc = parse_spec(minimal(distill={"discriminator": {"backbone": backbone}})).distill.discriminator
    assert disc.blocks == blocks
    assert disc.img_size == img


def test_discriminator_defaults_to_vit_l_and_keeps_explicit_blocks() -> None:
    disc = parse_spec(minimal()).distill.discriminator
    assert (disc.backbone, disc.blocks) == ("vit_l", [5, 11, 17, 23])
    disc = parse_spec(minimal(distill={"discriminator": {"backbone": "vit_b", "blocks": [11]}})).distill.discriminator
    assert disc.blocks == [11]


# ---------------------------------------------------------------------------------------------
# Errors name the field
# ---------------------------------------------------------------------------------------------

ERROR_CASES = [
    ("unknown-top", minimal(trainn={"max_steps": 3}), ["trainn"]),
    ("unknown-nested", minimal(train={"max_stepz": 20}), ["train.max_stepz"]),
    ("unknown-deep", minimal(distill={"discriminator": {"backbon": "vit_b"}}), ["distill.discriminator.backbon"]),
    ("max-steps-zero", minimal(train={"max_steps": 0}), ["train.max_steps"]),
    ("max-steps-type", minimal(train={"max_steps": "many"}), ["train.max_steps"]),
    ("lr-zero", minimal(optim={"generator": {"lr": 0}}), ["optim.generator.lr"]),
    ("lora-rank", minimal(model={"lora": {"rank": 0}}), ["model.lora.rank"]),
    ("no-teacher", {"data": {"builtin": "digits"}}, ["model"]),
    ("timesteps-increasing", minimal(schedule={"timesteps": [999, 499, 749, 249]}), ["schedule.timesteps"]),
    ("timesteps-repeated", minimal(schedule={"num_steps": 2, "timesteps": [499, 499]}), ["schedule.timesteps"]),
    ("timesteps-range", minimal(schedule={"num_steps": 2, "timesteps": [1000, 499]}), ["schedule.timesteps"]),
    ("timesteps-length", minimal(schedule={"timesteps": [999, 499]}),
     ["schedule.timesteps", "schedule.num_steps"]),
    ("dm-not-subset", minimal(schedule={"dm_steps": [999, 500]}), ["schedule.dm_steps"]),
    ("gan-not-subset", minimal(schedule={"gan_steps": [250]}), ["schedule.gan_steps"]),
    ("dm-empty", minimal(schedule={"dm_steps": []}), ["schedule.dm_steps"]),
    ("ema-too-big", minimal(distill={"ema": 1.5}), ["distill.ema"]),
    ("dmd2-with-ema", minimal(distill={"mode": "dmd2", "ema": 0.5}), ["distill.ema"]),
    ("dm-range", minimal(distill={"dm_min": 0.5, "dm_max": 0.5}), ["distill.dm_min"]),
    ("gan-loss", minimal(distill={"gan_loss": "wasserstein"}), ["distill.gan_loss"]),
    ("two-sources", minimal(data={"builtin": "digits", "images": "/data/imgs"}), ["data.images", "data.builtin"]),
    ("no-source", minimal(data={"builtin": None}), ["data.images", "data.manifest", "data.prompts"]),
    ("prompts-with-gan", minimal(data={"builtin": None, "prompts": "/p.txt"}),
     ["data.prompts", "distill.gan_weight"]),
    ("unknown-kind", minimal(kind="train"), ["kind"]),
]


@pytest.mark.parametrize(("raw", "fields"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_spec_error_names_field(raw: dict[str, Any], fields: list[str]) -> None:
    msg = spec_error(copy.deepcopy(raw))
    for field in fields:
        assert field in msg, f"{field!r} not in {msg!r}"


def test_error_line_starts_with_field_path() -> None:
    # One "path: message" line per error, so several bad fields are all reported.
    msg = spec_error(minimal(train={"max_steps": 0, "batch_size": 0}))
    starts = sorted(line.split(":", 1)[0] for line in msg.splitlines())
    assert starts == ["train.batch_size", "train.max_steps"]


def test_data_error_is_located_at_data() -> None:
    assert spec_error(minimal(data={"builtin": None})).startswith("data")


def test_prompts_only_ok_without_gan() -> None:
    cfg = parse_spec(minimal(data={"builtin": None, "prompts": "/p.txt"}, distill={"gan_weight": 0}))
    assert cfg.data.prompts == "/p.txt" and not cfg.data.has_real_images


def test_dmd2_with_zero_ema_ok() -> None:
    assert parse_spec(minimal(distill={"mode": "dmd2", "ema": 0.0})).distill.ema == 0.0


def test_empty_timesteps_list_is_rejected() -> None:
    assert "schedule.timesteps" in spec_error(minimal(schedule={"timesteps": []}))


def test_non_mapping_spec() -> None:
    with pytest.raises(SpecError):
        parse_spec([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------

def test_apply_overrides_types() -> None:
    raw = minimal(model={"teacher": "tiny:sd15", "lora": {"rank": 8}})
    out = apply_overrides(raw, ["train.max_steps=20", "schedule.timesteps=[999, 499]", "schedule.num_steps=2",
                                "model.lora=null", "distill.ema=0.5", "train.gradient_checkpointing=true",
                                "name=a=b"])
    assert out["train"]["max_steps"] == 20 and type(out["train"]["max_steps"]) is int
    assert out["schedule"]["timesteps"] == [999, 499]
    assert "lora" in out["model"] and out["model"]["lora"] is None
    assert out["distill"]["ema"] == 0.5
    assert out["train"]["gradient_checkpointing"] is True
    assert out["name"] == "a=b"  # split on the first "=" only
    assert out["model"]["teacher"] == "tiny:sd15"  # siblings untouched
    cfg = parse_spec(out)
    assert cfg.train.max_steps == 20
    assert (cfg.schedule.timesteps, cfg.schedule.dm_steps, cfg.schedule.gan_steps) == ([999, 499], [999], [499])
    assert cfg.model.lora is None
    assert cfg.distill.ema == 0.5


@pytest.mark.parametrize("item", ["train.max_steps", "train.max_steps:20", ""])
def test_malformed_override(item: str) -> None:
    with pytest.raises(SpecError) as info:
        apply_overrides(minimal(), [item])
    assert "key=value" in str(info.value)


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(SpecError) as info:
        apply_overrides(minimal(train={"max_steps": 5}), ["train.max_steps.x=1"])
    assert "max_steps" in str(info.value)


def test_override_bad_value_names_field_after_validation() -> None:
    raw = apply_overrides(minimal(), ["train.max_steps=0"])
    assert "train.max_steps" in spec_error(raw)


# ---------------------------------------------------------------------------------------------
# load_spec
# ---------------------------------------------------------------------------------------------

def test_load_spec_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("name", "text"), [("bad.yaml", "model: [unclosed\n  teacher: x"),
                                            ("bad.json", '{"model": {')])
def test_load_spec_invalid_syntax(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_load_spec_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01model")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_load_spec_non_mapping_with_override(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(SpecError):
        load_spec(path, ["train.max_steps=3"])


def test_load_spec_yaml_json_and_overrides(tmp_path: Path) -> None:
    y = tmp_path / "s.yaml"
    y.write_text("model:\n  teacher: tiny:sd15\ndata:\n  builtin: digits\ntrain:\n  max_steps: 7\n")
    j = tmp_path / "s.json"
    j.write_text(json.dumps(minimal(train={"max_steps": 7})))
    assert load_spec(y).train.max_steps == 7
    assert load_spec(j).train.max_steps == 7
    assert load_spec(y, ["train.max_steps=20"]).train.max_steps == 20


def test_load_spec_empty_file_names_missing_fields(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "model" in str(info.value) and "data" in str(info.value)


# ---------------------------------------------------------------------------------------------
# CLI: python -m trainer SPEC --dry-run
# ---------------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_cli_dry_run_prints_resolved_json() -> None:
    spec = REPO / "presets" / "tiny-sd15.yaml"
    proc = _cli(str(spec), "--dry-run", "--set", "train.max_steps=20")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["train"]["max_steps"] == 20
    assert out["schedule"]["timesteps"] == [999, 749, 499, 249]
    assert out["distill"]["ttur"] == 1 and out["distill"]["ema"] == 0.98
    assert out == load_spec(spec, ["train.max_steps=20"]).model_dump(mode="json")


def test_cli_bad_spec_exits_2_naming_field(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("model:\n  teacher: tiny:sd15\ndata:\n  builtin: digits\ntrain:\n  max_stepz: 20\n")
    proc = _cli(str(spec), "--dry-run")
    assert proc.returncode == 2
    assert "train.max_stepz" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cli_missing_file_and_malformed_set_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    proc = _cli(str(missing), "--dry-run")
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli(str(REPO / "presets" / "tiny-sd15.yaml"), "--dry-run", "--set", "train.max_steps")
    assert proc.returncode == 2 and "train.max_steps" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Bounds, finite floats, strict types and submit-time checks
# ---------------------------------------------------------------------------------------------

BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    (minimal(train={"max_steps": 10**20}), "train.max_steps"),
    (minimal(train={"max_steps": 2**31}), "train.max_steps"),
    (minimal(train={"seed": 10**30}), "train.seed"),
    (minimal(train={"seed": 2**32}), "train.seed"),
    (minimal(train={"checkpoint_every": 2**63}), "train.checkpoint_every"),
    (minimal(optim={"warmup_steps": 10**19}), "optim.warmup_steps"),
    (minimal(distill={"dm_weight": float("inf")}), "distill.dm_weight"),
    (minimal(distill={"fake_guidance": float("inf")}), "distill.fake_guidance"),
    (minimal(distill={"real_guidance": float("nan")}), "distill.real_guidance"),
    (minimal(optim={"generator": {"betas": [0.9, float("nan")]}}), "optim.generator.betas"),
    (minimal(optim={"grad_clip": float("-inf")}), "optim.grad_clip"),
    (minimal(train={"batch_size": "2"}), "train.batch_size"),
    (minimal(train={"batch_size": True}), "train.batch_size"),
    (minimal(train={"batch_size": 2.0}), "train.batch_size"),
    (minimal(train={"gradient_checkpointing": "yes"}), "train.gradient_checkpointing"),
    (minimal(train={"gradient_checkpointing": 1}), "train.gradient_checkpointing"),
    (minimal(distill={"dm_weight": "1.0"}), "distill.dm_weight"),
    (minimal(optim={"generator": {"betas": ["0.9", 0.99]}}), "optim.generator.betas"),
    (minimal(model={"resolution": 17}), "model.resolution"),
    (minimal(model={"resolution": 8192}), "model.resolution"),
    (minimal(model={"teacher": "tiny:../../etc"}), "model.teacher"),
    (minimal(model={"teacher": "toy:../x"}), "model.teacher"),
    (minimal(model={"teacher": "tiny:"}), "model.teacher"),
    (minimal(model={"teacher": "a\x00b"}), "model.teacher"),
    (minimal(model={"teacher": "\ud800/x"}), "model.teacher"),
    (minimal(name="x\x00"), "name"),
    (minimal(distill={"discriminator": {"backbone": "tiny", "blocks": [10**30]}}), "distill.discriminator"),
    (minimal(distill={"discriminator": {"img_size": 10**9}}), "distill.discriminator.img_size"),
]


@pytest.mark.parametrize("raw,field", BAD_VALUES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_VALUES)])
def test_bad_value_is_an_error_naming_the_field(raw: dict[str, Any], field: str) -> None:
    message = spec_error(raw)
    assert message.startswith(field), message


def test_eval_spec_bounds() -> None:
    base = {"kind": "eval", "eval": {"checkpoint": "/x"}}
    assert spec_error({**base, "eval": {"checkpoint": "/x", "seed": 2**40}}).startswith("eval.seed")
    assert spec_error({**base, "eval": {"checkpoint": "/x", "steps": [10**30]}}).startswith("eval.steps")
    assert spec_error({**base, "eval": {"checkpoint": "/x", "guidance": float("inf")}}).startswith("eval.guidance")
    assert parse_spec({**base, "eval": {"checkpoint": "/x", "seed": 2**32 - 1}}).eval.seed == 2**32 - 1


def test_rl_scorer_name_checked_at_submit() -> None:
    raw = minimal(kind="rl", rl={"reward": {"kind": "pixel", "scorer": "nope"}})
    assert "unknown pixel scorer" in spec_error(raw)


def test_bounds_at_the_edge_are_accepted() -> None:
    cfg = parse_spec(minimal(train={"max_steps": 2**31 - 1, "seed": 2**32 - 1}, model={"resolution": 16}))
    assert cfg.train.max_steps == 2**31 - 1 and cfg.model.resolution == 16
    assert parse_spec(minimal(model={"teacher": "toy:digits"})).model.teacher == "toy:digits"
    # An int is a fine float.
    assert parse_spec(minimal(distill={"dm_weight": 2})).distill.dm_weight == 2.0


def test_builtin_name_lists_match_the_trainer() -> None:
    from trainer.discriminator import _SAM_VARIANTS
    from trainer.jobspec.limits import PIXEL_SCORER_NAMES, SAM_DEPTH, TINY_FAMILIES
    from trainer.reward import PIXEL_SCORERS
    from trainer.tiny import FAMILIES

    assert TINY_FAMILIES == FAMILIES
    assert sorted(PIXEL_SCORER_NAMES) == sorted(PIXEL_SCORERS)
    assert {k: v[1] for k, v in _SAM_VARIANTS.items()} == {k: d for k, d in SAM_DEPTH.items() if k != "tiny"}


def test_yaml_specs_still_give_numbers(tmp_path: Path) -> None:
    """Strict types must not break YAML specs: YAML 1.1 reads `1e-4` as a string, our loader as a float."""
    path = tmp_path / "spec.yaml"
    path.write_text("model: {teacher: tiny:sd15}\ndata: {builtin: digits}\noptim: {generator: {lr: 1e-4}}\n"
                    "train: {batch_size: 2, gradient_checkpointing: yes}\n")
    cfg = load_spec(path, ["optim.fake_score.lr=3E-5", "train.seed=7", "distill.dm_weight=2"])
    assert cfg.optim.generator.lr == 1e-4 and cfg.optim.fake_score.lr == 3e-5
    assert cfg.train.batch_size == 2 and cfg.train.gradient_checkpointing is True and cfg.train.seed == 7
    with pytest.raises(SpecError, match="train.batch_size"):
        load_spec(path, ["train.batch_size='2'"])
