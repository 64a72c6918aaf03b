"""The strict base model of every spec section, and the small shared types and errors.

Like the rest of trainer/jobspec/, this imports only pydantic and yaml (through limits.py), so the API can validate a
spec without importing torch. Every model forbids unknown keys, so a typo is an error that names the field instead
of a silently ignored setting.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from trainer.jobspec.limits import check_storable_text, is_union_tag

NUM_TRAIN_TIMESTEPS = 1000
Family = Literal["sdxl", "sd15", "sd3"]


class Strict(BaseModel):
    """The base of every spec model: unknown keys, coercions, inf/NaN and unstorable text are errors."""

    # strict: "2" or true for an int is an error, not a silent coercion (YAML and `--set` give real
    # numbers and booleans: see limits.load_yaml). allow_inf_nan: JSON "Infinity" parses to a float that
    # SQLite stores as malformed JSON and Postgres refuses; no spec value is meaningful as inf or NaN.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _storable_text(cls, value: Any) -> Any:
        return check_storable_text(value)


class SpecError(ValueError):
    """A spec that does not validate; the message names every bad field."""


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not is_union_tag(p))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc or '<spec>'}: {msg}")
    return "\n".join(lines)


def default_timesteps(num_steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """DMD2's list: range(T-1, 0, -T//K), e.g. K=4 -> [999, 749, 499, 249]."""
    stride = num_train_timesteps // num_steps
    return list(range(num_train_timesteps - 1, 0, -stride))[:num_steps]
