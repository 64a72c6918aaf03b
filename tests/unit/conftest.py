"""Shared fixtures for the trainer's unit tier: tiny teachers built once per session."""

from __future__ import annotations

import pytest
import torch

from trainer.data import DigitsDataset
from trainer.jobspec import parse_spec
from trainer.tiny import tiny_pipeline_dir


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture(scope="session")
def tiny_dir(tiny_root):
    def get(family: str):
        return tiny_pipeline_dir(family, cache_root=tiny_root)

    return get


@pytest.fixture
def make_cfg(tiny_dir):
    """A small distill spec on a tiny teacher folder, with dotted overrides."""

    def make(family: str = "sdxl", **over):
        raw = {
            "model": {"teacher": str(tiny_dir(family))},
            "data": {"builtin": "digits"},
            "distill": {"real_guidance": 2.0, "discriminator": {"backbone": "tiny", "head_channels": 16}},
            "optim": {"generator": {"lr": 1e-3}, "fake_score": {"lr": 1e-3}, "discriminator": {"lr": 1e-3}},
            "train": {"batch_size": 2, "mixed_precision": "no", "max_steps": 4},
        }
        if family == "sd3":
            raw["model"]["lora"] = {"rank": 2, "alpha": 2}
        for key, value in over.items():
            node = raw
            *parents, leaf = key.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return parse_spec(raw)

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def batch():
    """batch(n, offset) -> a digits batch {"image": [n, 3, 32, 32], "caption": [n]}."""
    ds = DigitsDataset(32)

    def make(n: int = 2, offset: int = 0) -> dict:
        items = [ds[i + offset] for i in range(n)]
        return {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}

    return make
