"""The `kind: eval` job spec: score a checkpoint with the digits evaluator or the COCO-10k protocol.

Like the rest of trainer/jobspec/, this imports only pydantic, so the API validates eval specs without torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from trainer.jobspec.base import Strict
from trainer.jobspec.limits import INT32_MAX, SEED_MAX

ScorerKind = Literal["clip", "pickscore", "hpsv2", "imagereward", "fid"]


class ScorerSpec(Strict):
    """One pluggable scorer, loaded from weights the user supplies, local or on the hub (inference/scorers.py)."""

    kind: ScorerKind
    path: str = Field(min_length=1, description="clip/pickscore/hpsv2: a transformers CLIPModel folder; "
                      "imagereward: a transformers BLIP retrieval folder with imagereward_head.safetensors; "
                      "fid: a TorchScript feature detector (NVlabs inception-2015-12-05.pt); any of them may be a hub id "
                      "org/name[/path][@revision] (trainer/hub.py)")
    reference: str | None = Field(None, description="fid: reference statistics (.npz with mu and sigma) "
                                  "or a folder of reference images")
    name: str | None = Field(None, pattern=r"^[a-z0-9_]{1,40}$", description="metric name; default the kind")
    batch_size: int = Field(16, ge=1, le=1024)

    @model_validator(mode="after")
    def _check(self) -> ScorerSpec:
        if self.kind == "fid" and not self.reference:
            raise ValueError("reference is required for the fid scorer (an .npz with mu/sigma or an image folder)")
        if self.kind != "fid" and self.reference:
            raise ValueError(f"reference is only used by the fid scorer, not {self.kind}")
        return self

    @property
    def metric(self) -> str:
        return self.name or self.kind


class EvalSpec(Strict):
    checkpoint: str | None = Field(None, description="a step-* checkpoint folder or a run directory")
    job: str | None = Field(None, max_length=64, description="service only: a job of yours; the API sets "
                            "eval.checkpoint to its run directory")
    steps: Literal["latest", "all"] | list[Annotated[int, Field(ge=0, le=INT32_MAX)]] = Field(
        "latest", description="which checkpoints of a run directory: the latest, all, or these steps")
    protocol: Literal["digits", "prompts"] = Field(
        "digits", description="digits: the digits evaluator (FD, accuracy, diversity); prompts: generate one "
        "image per prompt of eval.prompts (the COCO-10k protocol) and apply eval.scorers")
    per_class: int = Field(100, ge=2, le=1000, description="digits: samples per digit (N = 10x)")
    prompts: str | None = Field(None, description="prompts: a text file (one prompt per line) or a JSONL "
                                "file with a caption or prompt per line")
    max_prompts: int | None = Field(None, ge=1, le=INT32_MAX, description="the first N prompts (COCO-10k: 10000)")
    scorers: list[ScorerSpec] = Field(default_factory=list)
    seed: int = Field(0, ge=0, le=SEED_MAX, description="image i uses seed seed * 1000003 + i")
    batch_size: int = Field(16, ge=1, le=1024, description="images generated per batch")
    guidance: float = Field(1.0, ge=1, description="CFG at sampling; few-step students use 1")
    grid: int = Field(16, ge=0, le=64, description="images saved as a sample grid per checkpoint")

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        if bool(self.checkpoint) == bool(self.job):
            raise ValueError("give exactly one of eval.checkpoint and eval.job")
        if isinstance(self.steps, list) and not self.steps:
            raise ValueError("eval.steps must not be an empty list")
        if self.protocol == "prompts":
            if not self.prompts:
                raise ValueError("eval.prompts is required by the prompts protocol")
            if not self.scorers:
                raise ValueError("eval.scorers must name at least one scorer for the prompts protocol")
        names = [s.metric for s in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.scorers have duplicate names {names}: set scorers[i].name")
        return self


class EvalJob(Strict):
    kind: Literal["eval"] = "eval"
    name: str | None = Field(None, max_length=200)
    eval: EvalSpec

    @property
    def total_steps(self) -> int:
        """Progress is counted in scored checkpoints."""
        return len(self.eval.steps) if isinstance(self.eval.steps, list) else 1
