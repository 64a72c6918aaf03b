"""The cost quote of `flashdmd plan`: expected wall time, GPU-hours and price of a spec's `train.max_steps`.

Seconds per iteration at batch 1 and 1024², per GPU type, for SDXL stage 1 (flash mode). Each row says where it
comes from and when; rows not measured are estimates and are marked so. Time scales with the samples per GPU
per iteration (batch x grad_accum) and, at other resolutions, with the latent pixels.

A stage-1 iteration is a generator turn (every TTUR-th step) or a critic-only turn; the measured pair gives both:
flash TTUR 1 = 2.874 s per iteration, flash TTUR 2 = 4.080 s per generator update (two iterations), so a
critic-only iteration takes 4.080 - 2.874 = 1.206 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.errors import InputError


@dataclass(frozen=True)
class CostRow:
    gpu: str
    generator_turn_s: float  # one iteration with a generator update, batch 1 at 1024²
    critic_turn_s: float  # one iteration without (fake score and D only)
    source: str
    date: str
    estimate: bool


H200_GEN, H200_CRITIC = 2.874, 4.080 - 2.874
_MEASURED = "bench/results/train_step_gpu.json (flash-ttur1, flash-ttur2; bf16, checkpointing, batch 1, 1024²)"
COSTS = {
    "h200": CostRow("NVIDIA H200", H200_GEN, H200_CRITIC, _MEASURED, "2026-11-26", estimate=False),
    # H100 SXM: the same GH100 compute as the H200 with 70% of its memory bandwidth: +10% assumed.
    "h100": CostRow("NVIDIA H100 80GB", 1.10 * H200_GEN, 1.10 * H200_CRITIC,
                    "estimate: H200 x 1.10 (same bf16 TFLOPS, 3.35 vs 4.8 TB/s)", "2026-12-05", estimate=True),
    # A100 80GB: 312 vs 989 dense bf16 TFLOPS; attention-heavy UNet steps run ~2.5x slower in public reports.
    "a100": CostRow("NVIDIA A100 80GB", 2.5 * H200_GEN, 2.5 * H200_CRITIC,
                    "estimate: H200 x 2.5 (312 vs 989 bf16 TFLOPS)", "2026-12-05", estimate=True),
}
# Communication and imbalance on several GPUs (not measured): DDP overlaps its all-reduce with backward, FSDP2
# gathers every unit in forward and backward.
MULTI_GPU_OVERHEAD = {"ddp": 1.05, "fsdp": 1.15}
# Stage 2's RL update (K-step rollout, k candidates scored by the LRM, one DPO forward/backward over the pairs),
# relative to a generator-turn iteration: an estimate, never measured.
RL_UPDATE_FACTOR = 1.5


@dataclass
class Quote:
    gpu: str
    gpus: int
    seconds: float
    estimate: bool
    source: str
    date: str
    price_per_gpu_hour: float | None = None

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600

    @property
    def cost(self) -> float | None:
        return None if self.price_per_gpu_hour is None else self.gpu_hours * self.price_per_gpu_hour

    def text(self) -> str:
        tag = " (ESTIMATE)" if self.estimate else ""
        line = (f"- expected time: {self.seconds / 3600:,.1f} h on {self.gpus} x {self.gpu}{tag} = "
                f"{self.gpu_hours:,.1f} GPU-hours; seconds/iteration from {self.source}, {self.date}")
        if self.cost is not None:
            line += f"\n- expected cost: {self.cost:,.0f} at {self.price_per_gpu_hour:g} per GPU-hour"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {"gpu_type": self.gpu, "gpus": self.gpus, "wall_hours": self.seconds / 3600,
                "gpu_hours": self.gpu_hours, "cost": self.cost, "estimate": self.estimate, "source": self.source,
                "date": self.date}


def quote(spec: Any, gpus: int, gpu_type: str = "h200", price_per_gpu_hour: float | None = None) -> Quote:
    """Wall time for spec.train.max_steps iterations on `gpus` GPUs of `gpu_type` (a key of COSTS)."""
    row = COSTS.get(gpu_type.lower())
    if row is None:
        raise InputError(f"--gpu-type: unknown GPU type {gpu_type!r}; known: {', '.join(sorted(COSTS))}")
    if price_per_gpu_hour is not None and price_per_gpu_hour < 0:
        raise InputError("--price-per-gpu-hour: must be >= 0")
    t = spec.train
    res = spec.model.resolution or 1024
    per_gpu = t.batch_size * t.grad_accum * (res / 1024) ** 2  # samples of 1024² per GPU per iteration
    ttur = spec.distill.ttur
    iteration = (row.generator_turn_s + (ttur - 1) * row.critic_turn_s) / ttur * per_gpu
    estimate = row.estimate or gpus > 1 or spec.kind == "rl"
    if gpus > 1:
        iteration *= MULTI_GPU_OVERHEAD[t.sharding]
    if spec.kind == "rl":  # each step: one RL update, plus a distillation or critic turn (trainer/rl.py)
        rl_batch = spec.rl.batch_size or t.batch_size
        critic_every = spec.rl.joint and spec.rl.critic_updates == "every"
        turns = (1 / spec.rl.ratio) * row.generator_turn_s + (
            (1 - 1 / spec.rl.ratio) * row.critic_turn_s if critic_every else 0.0)
        iteration = RL_UPDATE_FACTOR * row.generator_turn_s * rl_batch * (res / 1024) ** 2 + turns * per_gpu
    return Quote(row.gpu, gpus, iteration * t.max_steps, estimate, row.source, row.date, price_per_gpu_hour)
