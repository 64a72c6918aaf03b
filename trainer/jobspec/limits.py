"""Limits of the job spec: bounds the database and the trainer can take, names of built-ins, and the YAML
reading that lets strict spec models still take hand-written YAML.

Imports only the standard library and yaml (no torch), like the rest of trainer/jobspec/, which applies these.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from trainer.toy import TOY_TEACHERS

# Bounds that every stored number must respect. Step counts land in 32-bit columns (jobs.total_steps,
# metrics/checkpoints/samples.step), so they stay below 2^31; seeds are multiplied by ~10^6 and offset before
# they reach torch.Generator.manual_seed (trainer/data.py, inference/evaluate.py), and numpy takes < 2^32.
INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1
TINY_FAMILIES = ("sdxl", "sd15", "sd3")  # trainer/tiny.py FAMILIES (a unit test keeps them equal)
TOY_MODELS = tuple(TOY_TEACHERS)  # the teachers trainer/toy ships
PIXEL_SCORER_NAMES = ("brightness", "contrast")  # trainer/reward.py PIXEL_SCORERS
# Encoder depth per SAM backbone (trainer/discriminator.py): a head on block >= depth fails only in the worker.
SAM_DEPTH: dict[str, int] = {"vit_b": 12, "vit_l": 24, "vit_h": 32, "tiny": 4}
# train.validation (trainer/validation.py): every rank samples every image at each validation step, so the
# grid's size is bounded like a batch; a prompt is bounded like a caption the text encoders truncate anyway.
VALIDATION_MAX_PROMPTS = 64
VALIDATION_MAX_SEEDS = 16
VALIDATION_MAX_SIZES = 8
VALIDATION_MAX_IMAGES = 256  # prompts x seeds x sizes
VALIDATION_MAX_PROMPT_CHARS = 2000
# A hub reference for weights (SAM, reward model, scorers; trainer/hub.py): `org/name`, then optionally a path
# inside the repo (`/sub/file.pth`) and `@revision`. No segment starts with a dot, so no `..` and no hidden
# files; a value that looks local (/, ./, ../, ~) is a path, never a hub id.
HUB_REF = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})"
    r"(?P<path>(?:/[A-Za-z0-9_-][A-Za-z0-9_.-]*){0,16})"
    r"(?:@(?P<revision>[A-Za-z0-9_-][A-Za-z0-9_./-]{0,255}))?$"
)


def is_hub_ref(value: str) -> bool:
    return bool(HUB_REF.match(value)) and ".." not in value


def check_storable_text(value: Any) -> Any:
    """Strings (alone or in a list) must survive Postgres: no NUL (text and JSONB refuse it), no lone surrogate."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            if "\x00" in item:
                raise ValueError("must not contain a NUL character")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


def is_union_tag(part: Any) -> bool:
    """pydantic puts the union member in the location (`literal['latest','all']`, `list[constrained-int]`,
    `function-after[...]`); those are not fields, and a client looks for the field's dotted path."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "none"))


class _SpecLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: PyYAML (YAML 1.1) reads `1e-4` as a *string*, which the strict spec models
    would refuse; people write learning rates that way, so the file and `--set` paths read it as a float."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass: no arbitrary objects
