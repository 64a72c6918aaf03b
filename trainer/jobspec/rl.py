"""Stage 2, `kind: rl`: joint RL on the stage-1 generator (Sec. 3.4; Eqs. (12)-(13))."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trainer.jobspec.base import Strict
from trainer.jobspec.distill import DistillJob
from trainer.jobspec.limits import PIXEL_SCORER_NAMES
from trainer.jobspec.train import OptimizerSpec

# LPO's SDXL thresholds on the softmax gap of a (winner, loser) score pair; SD1.5 uses [0.35, 0.5].
RL_THRESHOLD_SDXL: tuple[float, float] = (0.45, 0.6)


class RewardSpec(Strict):
    kind: Literal["lrm", "pixel"] = "lrm"
    path: str | None = Field(None, description="lrm: a Latent Reward Model folder (unet/, text_encoder*/, "
                             "state_dict.pt) or a hub id org/name[/folder][@revision]; null: an UNTRAINED LRM built from the teacher (smoke tests only)")
    scorer: str | None = Field(None, description="pixel: a registered image scorer (trainer.reward.PIXEL_SCORERS)")
    vfe_scale: float = Field(7.5, ge=1, description="LRM visual feature enhancement: CFG on the mid feature")
    score_at: Literal["next", "current"] = Field(
        "next", description="score candidates z_s at s (next) or, as LPO does, at the current t")

    @model_validator(mode="after")
    def _check(self) -> RewardSpec:
        if self.kind == "pixel" and not self.scorer:
            raise ValueError("rl.reward.scorer is required when rl.reward.kind is pixel")
        if self.scorer is not None and self.scorer not in PIXEL_SCORER_NAMES:
            raise ValueError(f"rl.reward.scorer: unknown pixel scorer {self.scorer!r}; known: {list(PIXEL_SCORER_NAMES)}")
        return self


class RLSpec(Strict):
    init_from: str | None = Field(None, description="stage-1 checkpoint folder (or run dir: its latest); "
                                  "null: start from the teacher, with a warning event")
    reward: RewardSpec = Field(default_factory=RewardSpec)
    timesteps: list[int] | Literal["all"] | None = Field(
        None, description="steps of S with RL candidates; default the high-noise steps S[:2] "
        "([999, 749] for K=4, [999, 874] for K=8); 'all': every step but the deterministic last")
    num_candidates: int = Field(4, ge=2, le=64, description="k candidates z_s per shared z_t")
    beta: float = Field(500.0, gt=0, description="beta of Eq. (12); LPO's 500 with element-mean log-probs")
    threshold_min: float = Field(RL_THRESHOLD_SDXL[0], ge=-1, le=1)
    threshold_max: float = Field(RL_THRESHOLD_SDXL[1], ge=-1, le=1,
                                 description="pair kept when softmax gap p_w - p_l exceeds the threshold, "
                                 "interpolated by the transition std from min (low noise) to max (high noise)")
    ratio: int = Field(5, ge=1, le=1000, description="RL updates per distillation update (Table 4: 5:1)")
    joint: bool = Field(True, description="false: post-train RL only (no distillation updates)")
    ratio_clip: float | None = Field(None, gt=0, lt=1, description="LPO/SPO clamp of each ratio to "
                                     "[1-c, 1+c] (LPO: 0.1); null: Eq. (13) as written")
    batch_size: int | None = Field(None, ge=1, le=4096, description="prompts per RL update; default train.batch_size")
    critic_updates: Literal["every", "distill_only"] = Field(
        "every", description="every: the fake score and D update every iteration (Alg. 1 lines 20-26); "
        "distill_only: only on distillation turns")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="a separate AdamW for L_rl")

    @model_validator(mode="after")
    def _check(self) -> RLSpec:
        if self.threshold_min > self.threshold_max:
            raise ValueError("rl.threshold_min must not exceed rl.threshold_max")
        return self


class RLJob(DistillJob):
    """Stage 2: G and the fake score from a stage-1 checkpoint, N RL updates per distillation update."""

    kind: Literal["rl"] = "rl"  # type: ignore[assignment]
    rl: RLSpec = Field(default_factory=RLSpec)

    @model_validator(mode="after")
    def _rl_steps(self) -> RLJob:
        ts = self.schedule.timesteps
        if len(ts) < 2:
            raise ValueError("rl needs schedule.num_steps >= 2: the last step is deterministic and has no RL term")
        steps = self.rl.timesteps
        if steps is None:
            steps = ts[: min(2, len(ts) - 1)]
        elif steps == "all":
            steps = ts[:-1]
        if not steps:
            raise ValueError("rl.timesteps must not be empty")
        bad = [t for t in steps if t not in ts]
        if bad:
            raise ValueError(f"rl.timesteps {bad} are not in schedule.timesteps {ts}")
        if ts[-1] in steps:
            raise ValueError(f"rl.timesteps must not contain the last step {ts[-1]}: it is deterministic, "
                             "so Eq. (13) has no density there")
        self.rl.__dict__["timesteps"] = sorted(set(steps), reverse=True)
        return self

