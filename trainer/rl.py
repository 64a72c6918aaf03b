"""Stage 2, joint RL (Sec. 3.4; Alg. 1 lines 27-31; DESIGN §3 "Stage 2, joint RL").

One RL update:
  1. iterativeSample (line 28): from fresh noise, run the K-step sampler with the current G (no grad). At every
     RL timestep t (default the high-noise steps), draw k candidates z_s^j = step_to(G(z_t, t), s, eps_j) that
     share z_t and differ only by eps_j, score them with the reward model, and continue the trajectory from a
     uniformly random candidate (LPO/SPO's step-wise resampler). The last step of S is deterministic (no
     noise is added after it), so it never yields candidates and never gets an RL term.
  2. filter (line 29): keep (z_t, z_w, z_l) = (shared input, best, worst) when the softmax-normalised gap
     p_w - p_l exceeds a threshold interpolated by the transition std (LPO's "sigma" schedule).
  3. preferenceOptimization (lines 30-31): the DPO loss of Eq. (12)-(13) against a frozen reference G_ref
     (the stage-1 generator) and one update of G with its own AdamW.
`JointRL.step((prompts, distill_batch), step)` alternates: rl.ratio RL updates, then one stage-1 distillation
iteration (`Distiller.step`), unless rl.joint is false (post-train RL only). The loop's stage-2 method
(trainer/rl_loop.py RLMethod) is a JointRL with its data, events and checkpoint record.
rl.critic_updates (default every, Alg. 1): on the RL iterations between distillation turns the fake score and
D still update (lines 20-26) on a distillation batch; distill_only: they update on distillation turns only.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trainer.distill import Distiller
from trainer.jobspec import RLSpec
from trainer.losses import dpo_loss, gaussian_log_density
from trainer.models import Cond, predict_x0
from trainer.optim import build_optimizer
from trainer.parallel import agree_any, gathered
from trainer.reward import RewardModel
from trainer.rng import Gen, randint, randn
from trainer.schedules import Parameterisation

if TYPE_CHECKING:
    from accelerate import Accelerator

Denoise = Callable[[Tensor, Tensor], Tensor]  # (z_t [B, C, H, W], t [B]) -> x0 [B, C, H, W]
# One stage-2 step's input: the RL prompts, and how to draw a distillation batch (drawn only on the
# iterations that run a distillation or critic update, so the data order does not depend on the ratio's phase).
RLBatch = tuple[list[str], Callable[[], dict | list[dict]] | None]


# -------------------------------------------------------------------- pure pieces
def stochastic_transitions(S: Sequence[int]) -> list[tuple[int, int]]:
    """(t, s) for every transition that adds noise: all of S but the last step, whose output is final."""
    return [(int(S[i]), int(S[i + 1])) for i in range(len(S) - 1)]


def pair_threshold(std: float, stds: Sequence[float], th_min: float, th_max: float) -> float:
    """LPO's dynamic threshold: th_min at the smallest transition std of the schedule, th_max at the largest."""
    lo, hi = min(stds), max(stds)
    if hi - lo < 1e-12:
        return th_max
    return th_min + (std - lo) / (hi - lo) * (th_max - th_min)


def sample_candidates(x0: Tensor, s: int, k: int, param: Parameterisation,
                      generator: Gen = None) -> tuple[Tensor, Tensor]:
    """k next latents through the sampler's own transition, z_s^j = step_to(x0(z_t), s, eps_j).

    x0: G(z_t, t) for the shared z_t          [B, C, H, W]
    returns (candidates, eps)                 [B, k, C, H, W] each
    """
    b = x0.shape[0]
    eps = randn((b, k, *x0.shape[1:]), generator).to(x0.device, x0.dtype)  # per sample: k rows each
    x0k = x0.unsqueeze(1).expand(b, k, *x0.shape[1:]).reshape(b * k, *x0.shape[1:])
    cands = param.step_to(x0k, s, eps.reshape(b * k, *x0.shape[1:]))
    return cands.reshape(b, k, *x0.shape[1:]), eps


@dataclass
class Choice:
    win: Tensor  # [B] index of the best candidate
    lose: Tensor  # [B] index of the worst
    gap: Tensor  # [B] raw score gap r_w - r_l
    norm_gap: Tensor  # [B] softmax over (r_w, r_l): p_w - p_l = tanh(gap / 2), in [0, 1)
    keep: Tensor  # [B] bool: norm_gap > threshold


def choose_pairs(scores: Tensor, threshold: float) -> Choice:
    """scores [B, k] -> the best/worst candidate per group and whether the pair is decisive enough."""
    win, lose = scores.argmax(dim=1), scores.argmin(dim=1)
    idx = torch.arange(scores.shape[0], device=scores.device)
    r_w, r_l = scores[idx, win], scores[idx, lose]
    p = torch.softmax(torch.stack([r_w, r_l], dim=1).double(), dim=1)  # [B, 2]
    norm_gap = (p[:, 0] - p[:, 1]).float()
    return Choice(win, lose, r_w - r_l, norm_gap, (norm_gap > threshold) & (win != lose))


@dataclass
class Pairs:
    z_t: Tensor  # [P, C, H, W] the shared input
    t: Tensor  # [P] its timestep
    s: Tensor  # [P] the next timestep
    z_w: Tensor  # [P, C, H, W]
    z_l: Tensor  # [P, C, H, W]
    prompt: Tensor  # [P] index into the batch's prompts
    gap: Tensor  # [P] raw reward gap

    def __len__(self) -> int:
        return int(self.t.shape[0])

    @staticmethod
    def empty(like: Tensor) -> Pairs:
        idx = torch.zeros(0, dtype=torch.long, device=like.device)
        return Pairs(like[:0], idx, idx, like[:0], like[:0], idx, torch.zeros(0, device=like.device))

    @staticmethod
    def cat(parts: list[Pairs]) -> Pairs:
        return Pairs(*(torch.cat([getattr(p, f) for p in parts]) for f in
                       ("z_t", "t", "s", "z_w", "z_l", "prompt", "gap")))


@torch.no_grad()
def collect_pairs(denoise: Denoise, reward: RewardModel, prompts: Sequence[str], noise: Tensor,
                  S: Sequence[int], rl_steps: Sequence[int], k: int, param: Parameterisation,
                  thresholds: dict[int, float], score_at: str = "next",
                  generator: Gen = None) -> tuple[Pairs, dict[str, float]]:
    """Alg. 1 lines 28-29: sample the trajectory, candidates at each RL step, and keep decisive pairs.

    noise: z at S[0] [B, C, H, W]; thresholds: RL timestep -> threshold on the normalised gap.
    """
    b, dev = noise.shape[0], noise.device
    transitions = stochastic_transitions(S)  # explicit: the deterministic last step is not in here
    last = max(i for i, (t, _) in enumerate(transitions) if t in rl_steps)
    z, parts = noise, []
    all_scores, norm_gaps, kept = [], [], 0
    for t, s in transitions[: last + 1]:
        tt = torch.full((b,), t, device=dev, dtype=torch.long)
        x0 = denoise(z, tt)
        if t not in rl_steps:
            z = param.step_to(x0, s, randn(x0.shape, generator).to(dev, x0.dtype))
            continue
        cands, _ = sample_candidates(x0, s, k, param, generator)  # [B, k, C, H, W]
        at = s if score_at == "next" else t
        flat_prompts = [p for p in prompts for _ in range(k)]
        scores = reward.score(cands.flatten(0, 1), torch.full((b * k,), at, device=dev, dtype=torch.long),
                              flat_prompts).float().reshape(b, k)  # [B, k]
        ch = choose_pairs(scores, thresholds[t])
        all_scores.append(scores.flatten().cpu())
        norm_gaps.append(ch.norm_gap.cpu())
        sel = ch.keep.nonzero().flatten()
        kept += int(sel.numel())
        if sel.numel():
            parts.append(Pairs(z[sel], torch.full((sel.numel(),), t, dtype=torch.long, device=dev),
                               torch.full((sel.numel(),), s, dtype=torch.long, device=dev),
                               cands[sel, ch.win[sel]], cands[sel, ch.lose[sel]], sel, ch.gap[sel]))
        pick = randint(0, k, b, generator, dev)  # continue from a random candidate
        z = cands[torch.arange(b, device=dev), pick]
    groups = b * len([t for t, _ in transitions if t in rl_steps])
    scores_all = torch.cat(all_scores)
    pairs = Pairs.cat(parts) if parts else Pairs.empty(noise)
    logs = {"rl/reward_mean": scores_all.mean().item(), "rl/reward_std": scores_all.std().item(),
            "rl/kept_frac": kept / max(groups, 1), "rl/num_pairs": float(kept),
            "rl/norm_gap": torch.cat(norm_gaps).mean().item()}
    if kept:
        logs["rl/reward_gap"] = pairs.gap.mean().item()
    return pairs, logs


def pair_log_probs(pairs: Pairs, x0_theta: Tensor, x0_ref: Tensor,
                   param: Parameterisation) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four log-densities of Eq. (13): p(z_s | z_t, c) = N(x0_coef(s) * x0(z_t), std(s)^2 I).

    x0_theta (with grad), x0_ref (no grad): the policy's and the reference's x0 of pairs.z_t  [P, C, H, W]
    returns log p_theta(w), log p_ref(w), log p_theta(l), log p_ref(l)                      [P] each
    """
    a = param.x0_coef(pairs.s).reshape(-1, 1, 1, 1)  # [P, 1, 1, 1] float64
    std = param.std(pairs.s)  # [P]
    mean_theta, mean_ref = a * x0_theta.double(), a * x0_ref.double()
    return (gaussian_log_density(pairs.z_w, mean_theta, std), gaussian_log_density(pairs.z_w, mean_ref, std),
            gaussian_log_density(pairs.z_l, mean_theta, std), gaussian_log_density(pairs.z_l, mean_ref, std))


# -------------------------------------------------------------------- the stage-2 trainer
class JointRL:
    """Wraps a stage-1 `Distiller` (already initialised from the stage-1 checkpoint) with the RL update. It takes
    the job's `rl` section; the optimiser and memory sections are the wrapped Distiller's (one job)."""

    def __init__(self, distiller: Distiller, reward: RewardModel, accelerator: Accelerator, *, rl: RLSpec) -> None:
        self.rl, self.distiller, self.reward, self.acc = rl, distiller, reward, accelerator
        self.teacher, self.param, self.S = distiller.teacher, distiller.param, distiller.S
        # p_ref: a frozen copy of G as it is now, i.e. the stage-1 generator.
        self.ref: nn.Module = copy.deepcopy(distiller.generator).requires_grad_(False).eval()
        if distiller.memory.ref_bf16:  # it only runs under bf16 autocast (ref_x0), which already casts its matmul
            # weights to bf16: bf16 storage halves it and changes only the norms' weights' rounding
            self.ref.to(torch.bfloat16)
        self.rl_steps = list(rl.timesteps)
        stds = {t: float(self.param.std(torch.tensor([s]))[0]) for t, s in stochastic_transitions(self.S)}
        self.thresholds = {t: pair_threshold(stds[t], list(stds.values()), rl.threshold_min,
                                             rl.threshold_max) for t in self.rl_steps}
        spec, optim = rl.optimizer, distiller.optim
        params = [p for p in distiller.generator.parameters() if p.requires_grad]
        # memory.rl_optimizer: shared steps L_rl with the generator's own optimiser (rl_update sets its lr to
        # rl.optimizer.lr; the distillation step sets it back). Alg. 1 has one generator theta updated by both
        # objectives, so one set of moments is the paper's reading, and it saves a full-size AdamW (19 GiB in
        # fp32 for SDXL). The betas and weight decay are then optim.generator's. separate keeps a second one.
        self.shared_optimizer = distiller.memory.rl_optimizer == "shared"
        if self.shared_optimizer:
            self.opt_rl = distiller.opt_g
        else:
            self.opt_rl = accelerator.prepare(build_optimizer(params, spec, optim.optimizer,
                                                              optim.adamw8bit_backend))

    # what checkpoint.py and the sample grid need, as for a Distiller
    @property
    def generator(self) -> nn.Module:
        return self.distiller.generator

    def trainable_modules(self) -> dict[str, nn.Module]:
        return self.distiller.trainable_modules()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {**self.distiller.optimizers(), **({} if self.shared_optimizer else {"rl": self.opt_rl})}

    def ref_x0(self, z_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        with torch.no_grad(), self.acc.autocast():
            return predict_x0(self.ref, z_t, t, cond, self.param).float()

    def rl_update(self, prompts: list[str], step: int) -> dict[str, float]:
        """Alg. 1 lines 28-31 for one batch of prompts."""
        d, rl = self.distiller, self.rl
        warm = d.optim.warmup_steps
        for group in self.opt_rl.param_groups:
            group["lr"] = rl.optimizer.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)
        gen = d.sample_rng(step, 101, 0, len(prompts))
        cond = self.teacher.encode(prompts)
        noise = d.randn(self.teacher.latent_shape(len(prompts)), gen)
        with gathered(d.generator):  # a sharded G: one gather for all rollout forwards, not one per forward
            pairs, logs = collect_pairs(lambda z, t: d.gen_x0(z, t, cond), self.reward, prompts, noise, self.S,
                                        self.rl_steps, rl.num_candidates, self.param, self.thresholds,
                                        rl.reward.score_at, gen)
        logs["rl/lr"] = self.opt_rl.param_groups[0]["lr"]
        params = [p for p in d.generator.parameters() if p.requires_grad]
        (any_pairs,) = agree_any(self.acc, len(pairs) > 0)
        if not any_pairs:  # no rank kept a pair: every rank skips the update together
            logs["rl/updated"] = 0.0
            return logs
        if not len(pairs):
            # Other ranks have pairs and will all-reduce G's gradients: join with a zero loss through the
            # wrapped G (its one forward of this backward), so the collectives match.
            tt = torch.full((1,), self.rl_steps[0], device=noise.device, dtype=torch.long)
            loss = d.gen_x0(noise[:1], tt, cond[:1], d.generator_w).sum() * 0.0
        else:
            pc = cond[pairs.prompt]
            x0_theta = d.gen_x0(pairs.z_t, pairs.t, pc, d.generator_w)  # one forward per pair: w, l share z_t
            x0_ref = self.ref_x0(pairs.z_t, pairs.t, pc)
            loss, dpo_logs = dpo_loss(*pair_log_probs(pairs, x0_theta, x0_ref, self.param), beta=rl.beta,
                                      ratio_clip=rl.ratio_clip)
            logs.update(dpo_logs)
        self.opt_rl.zero_grad(set_to_none=True)  # one loss: the accumulation path of Alg. 1 with n = 1
        d.backward(loss)
        upd = d.finish(params, self.opt_rl, bool(torch.isfinite(loss)))
        logs.update({"grad_norm/rl": upd.grad_norm, "skipped/rl": float(not upd.applied),
                     "rl/updated": float(upd.applied)})
        return logs

    def distill_turn(self, step: int) -> bool:
        """After every rl.ratio RL updates comes one distillation iteration (Table 4's N:1)."""
        return self.rl.joint and (step + 1) % self.rl.ratio == 0

    def critic_turn(self, step: int) -> bool:
        """rl.critic_updates: every -> the fake score and D also update on RL iterations (Alg. 1 lines 20-26
        run every iteration); distill_only -> only on distillation turns. Not in post-train RL (joint false)."""
        return self.rl.joint and self.rl.critic_updates == "every" and not self.distill_turn(step)

    def step(self, batch: RLBatch, step: int) -> dict[str, float]:
        """One RL update on the prompts, then (on its turns) a distillation or critic-only iteration."""
        prompts, distill_batch = batch
        logs = self.rl_update(prompts, step)
        turn, critic = self.distill_turn(step), self.critic_turn(step)
        logs["distill_turn"] = float(turn)
        if (turn or critic) and distill_batch is None:
            raise ValueError("a distillation or critic turn needs a batch")
        if turn:
            logs.update(self.distiller.step(distill_batch(), step // self.rl.ratio))
        elif critic:
            # Keyed by the RL step with its own salt, so its noise never repeats a distillation turn's.
            logs.update(self.distiller.step(distill_batch(), step, train_generator=False, salt=1000))
        return logs
