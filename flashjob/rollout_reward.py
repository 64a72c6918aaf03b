"""A reward model that ranks the generator's own candidates at the high-noise RL steps.

    python -m flashjob.rollout_reward --generator runs/bench-quality/flash-ttur1-k4-s0 \
        --out trainer/toy/digits_reward_rollout

Why a second pair set. At an RL step t, stage 2 scores k candidates z_s^j = step_to(G(z_t, t), s, eps_j) that share
G's x0 and differ only by eps_j (trainer/rl.py, Alg. 1 line 28). The shipped toy LRM learnt from (real, degraded)
digit pairs whose two latents are noised independently; at those noise levels the clean latent is a few percent of
the variance and no model can rank such pairs well (bench/lrm_ceiling.py: 0.64 at t = 999, 0.86 at 749). The
generator's candidates are a different problem: what separates them is the noise itself, and where a candidate
ends is a (nearly deterministic) function of it through G. So "which candidate ends better" can be learnt.

Pairs (our design): per group, a prompt and fresh noise; G's K-step sampler runs to the RL step t; k candidates are
drawn at the next step s exactly as stage 2 draws them; each candidate is continued to the end C times with common
random numbers (the same later noise for the k candidates of a group, so the comparison is paired) and valued by
the mean reward of its final latents under the judge (the shipped LRM at t = 0: the reward bench/rl_ablation.py
reports). A group gives one pair: its best vs its worst candidate, both at noise level s. The label's own noise is
measured, not assumed: held-out groups are valued twice with independent continuations, and the rate at which the
second valuation agrees with the first is the accuracy even a perfect model of one valuation could expect.
The LRM is fine-tuned from the shipped one on these pairs mixed 1:1 with its original pairs (noised as before), so
it keeps ranking clean digits; the report gives both accuracies before and after.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch
from torch import Tensor

from trainer.data import DigitsDataset
from trainer.reward import LatentRewardModel, load_lrm, lrm_pair_loss, save_lrm
from trainer.reward_train import LRM_TIMESTEPS, lrm_pair_step
from trainer.schedules import Parameterisation
from trainer.toy.prompts import digit_prompt
from trainer.toy.reward import batches, encode_pairs, make_pairs, pair_accuracy, split

if TYPE_CHECKING:
    from inference.pipeline import FewStepPipeline
    from trainer.models import Cond

Denoise = Callable[[Tensor, Tensor, Tensor], Tensor]  # (z_t [N, C, H, W], t [N], prompt rows [N]) -> x0
Judge = Callable[[Tensor, Sequence[str]], Tensor]  # final latents [N, C, H, W], prompts -> reward [N]


def check_rl_steps(rl_steps: Sequence[int], S: Sequence[int]) -> None:
    """RL steps must be timesteps of the generator's schedule S, but not its deterministic last one."""
    if bad := [t for t in rl_steps if t not in S[:-1]] or not rl_steps:
        raise ValueError(f"{bad or list(rl_steps)}: RL steps must be among the generator's timesteps {list(S)} but "
                         "its deterministic last one")


@torch.no_grad()
def candidate_values(denoise: Denoise, judge: Judge, cands: Tensor, prompts: Sequence[str], S: Sequence[int],
                     s_index: int, continuations: int, param: Parameterisation, gen: torch.Generator) -> Tensor:
    """Mean final reward of each candidate over `continuations` rollouts of G from it.

    cands: candidates at S[s_index], k per prompt                   [B, k, C, H, W]
    returns the value of each                                        [B, k]
    Every rollout uses the same later noise for the k candidates of a group (common random numbers).
    """
    b, k = cands.shape[:2]
    rows = torch.arange(b, device=cands.device).repeat_interleave(k)  # [B*k] prompt row of each candidate
    flat_prompts = [prompts[int(r)] for r in rows]
    total = torch.zeros(b, k)
    for _ in range(continuations):
        z = cands.flatten(0, 1)
        for i in range(s_index, len(S)):
            t = torch.full((b * k,), S[i], dtype=torch.long, device=z.device)
            x0 = denoise(z, t, rows)
            if i == len(S) - 1:
                z = x0  # the last step is deterministic: its x0 is the output
                break
            eps = torch.randn((b, 1, *z.shape[1:]), generator=gen).expand(b, k, *z.shape[1:]).flatten(0, 1)
            z = param.step_to(x0, S[i + 1], eps.to(z.device, z.dtype))
        total += judge(z, flat_prompts).float().reshape(b, k).cpu()
    return total / continuations


@torch.no_grad()
def rollout_pairs(denoise: Denoise, judge: Judge, labels: Tensor, latent_shape: tuple[int, ...], S: Sequence[int],
                  rl_step: int, k: int, continuations: int, param: Parameterisation, gen: torch.Generator,
                  second_valuation: bool = False) -> dict:
    """One best-vs-worst pair per label (a group): candidates at s, the step after `rl_step`, as stage 2 draws them.

    returns {"prompt" [B], "winner"/"loser" [B, C, H, W] (noisy, at s), "s" [B], "gap" [B] value gap,
             "agree" [B] bool (second_valuation: an independent valuation ranks the pair the same way)}
    """
    b = len(labels)
    prompts = [digit_prompt(int(c)) for c in labels]
    rows = torch.arange(b)
    check_rl_steps([rl_step], S)
    i_t = list(S).index(rl_step)
    z = torch.randn((b, *latent_shape), generator=gen)
    for i in range(i_t + 1):  # G's sampler with fresh noise up to the RL step, then k candidates at s
        t = torch.full((b,), S[i], dtype=torch.long)
        x0 = denoise(z, t, rows)
        n = k if i == i_t else 1
        eps = torch.randn((b, n, *latent_shape), generator=gen)
        z = param.step_to(x0.unsqueeze(1).expand(b, n, *latent_shape).flatten(0, 1), S[i + 1],
                          eps.flatten(0, 1)).reshape(b, n, *latent_shape)
        if i < i_t:
            z = z[:, 0]
    cands = z  # [B, k, C, H, W]
    value = candidate_values(denoise, judge, cands, prompts, S, i_t + 1, continuations, param, gen)
    win, lose = value.argmax(1), value.argmin(1)
    out = {"prompt": prompts, "winner": cands[rows, win], "loser": cands[rows, lose],
           "s": torch.full((b,), S[i_t + 1], dtype=torch.long), "gap": value[rows, win] - value[rows, lose]}
    if second_valuation:
        again = candidate_values(denoise, judge, cands, prompts, S, i_t + 1, continuations, param, gen)
        out["agree"] = again[rows, win] > again[rows, lose]
    return out


@torch.no_grad()
def rollout_accuracy(lrm: LatentRewardModel, pairs: dict, chunk: int = 256) -> float:
    """Fraction of pairs whose winner the LRM scores higher, both at their own noise level s (no noise added)."""
    won = []
    for i in range(0, len(pairs["prompt"]), chunk):
        p, s = pairs["prompt"][i:i + chunk], pairs["s"][i:i + chunk]
        won.append(lrm.score(pairs["winner"][i:i + chunk], s, p) > lrm.score(pairs["loser"][i:i + chunk], s, p))
    won_all = torch.cat(won)
    return int(won_all.sum()) / len(won_all)  # exact: a float32 mean turns 360/400 into 0.8999999762


def noisy_pair_loss(lrm: LatentRewardModel, batch: dict) -> tuple[Tensor, dict[str, float]]:
    """The LRM pair loss on latents that are already noisy (at batch["s"]): winner first, label 1."""
    b = len(batch["prompt"])
    text = lrm.encode(list(batch["prompt"]))
    scores = lrm.score_text(torch.cat([batch["winner"], batch["loser"]]), batch["s"].repeat(2),
                            text.index(torch.arange(b).repeat(2)))
    return lrm_pair_loss(scores[:b], scores[b:], torch.ones(b))


def finetune(lrm: LatentRewardModel, rollout: Iterator[dict], original: Iterator[dict], param: Parameterisation, *,
             steps: int, lr: float, seed: int, log: Callable[[int, dict[str, float]], None]) -> None:
    """Every step's loss is the mean over a rollout-pair batch and an original-pair batch (no alternation)."""
    lrm.train().requires_grad_(True)
    params = [p for p in lrm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        loss_r, logs_r = noisy_pair_loss(lrm, next(rollout))
        batch = next(original)
        loss_o, logs_o = lrm_pair_step(lrm, batch["winner"], batch["loser"], batch["prompt"], batch["label"], param,
                                       gen, LRM_TIMESTEPS)
        loss = 0.5 * (loss_r + loss_o)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        opt.step()
        log(step, {"loss/rollout": logs_r["loss/lrm"], "acc/rollout": logs_r["lrm/pair_acc"],
                   "loss/original": logs_o["loss/lrm"], "grad_norm/lrm": grad})
    lrm.eval().requires_grad_(False)


def generator_pairs(pipe: FewStepPipeline, judge_lrm: LatentRewardModel, n: int, rl_step: int, k: int,
                    continuations: int,
                    gen: torch.Generator, second_valuation: bool = False, chunk: int = 250) -> dict:
    """`rollout_pairs` for n random digit prompts with a loaded few-step pipeline (inference.pipeline) as G and
    the judge's reward at t = 0 as the value, in chunks of `chunk` groups."""
    from trainer.models import predict_x0

    S = pipe.info.timesteps_for(None)
    w, h = pipe.size(None, None)
    latent_shape = (pipe.geometry.latent_channels, h // pipe.geometry.vae_scale, w // pipe.geometry.vae_scale)
    labels = torch.randint(10, (n,), generator=gen)
    chunks = []
    for lo in range(0, n, chunk):
        lab = labels[lo:lo + chunk]
        cond = pipe.encode([digit_prompt(int(c)) for c in lab], w, h)

        def denoise(z: Tensor, t: Tensor, rows: Tensor, cond: Cond = cond) -> Tensor:
            return predict_x0(pipe.net, z, t, cond[rows], pipe.param).float()

        def judge(lat: Tensor, prompts: Sequence[str]) -> Tensor:
            return judge_lrm.score(lat, torch.zeros(len(lat), dtype=torch.long), prompts)

        chunks.append(rollout_pairs(denoise, judge, lab, latent_shape, S, rl_step, k, continuations, pipe.param, gen,
                                    second_valuation=second_valuation))
    return {key: (sum((c[key] for c in chunks), []) if key == "prompt" else torch.cat([c[key] for c in chunks]))
            for key in chunks[0]}


def train_rollout_reward(generator: str | Path, out: Path | None, *, groups: int = 2000, test_groups: int = 400,
                         rl_steps: Sequence[int] = (999, 749), k: int = 4, continuations: int = 4, steps: int = 600,
                         batch_size: int = 16, lr: float = 5e-5, seed: int = 0,
                         original_pairs: tuple[int, int] = (4000, 800)) -> dict:
    """Rollout pairs of `generator` at `rl_steps`, the LRM fine-tuned from the shipped judge on them mixed with the
    original pairs (train, held-out counts: `original_pairs`), held-out accuracies before and after; saved to `out`."""
    from inference.pipeline import load_pipeline
    from trainer.toy import HERE

    torch.manual_seed(seed)
    t0 = time.time()
    pipe = load_pipeline(generator)
    teacher, param = pipe.teacher, pipe.param
    S = pipe.info.timesteps_for(None)
    check_rl_steps(rl_steps, S)
    base_dir = HERE / "digits_reward"
    judge_lrm = load_lrm(base_dir, base=teacher.pipe).eval()
    lrm = copy.deepcopy(judge_lrm)  # the one that trains; the judge stays as shipped
    gen = torch.Generator().manual_seed(seed)

    def pairs_for(n: int, rl_step: int, second: bool) -> dict:
        return generator_pairs(pipe, judge_lrm, n, rl_step, k, continuations, gen, second)

    click.echo(f"rollouts of {generator}: {groups} + {test_groups} groups per RL step {list(rl_steps)}, "
               f"k = {k}, C = {continuations}", err=True)
    train_parts = [pairs_for(groups, t, False) for t in rl_steps]
    test = {t: pairs_for(test_groups, t, True) for t in rl_steps}
    train = {key: (sum((p[key] for p in train_parts), []) if key == "prompt" else torch.cat([p[key] for p in train_parts]))
             for key in train_parts[0]}
    # The original pairs, as trainer/toy/reward.py builds them (same split and seed: its held-out digits stay out).
    ds = DigitsDataset(teacher.resolution)
    dlabels = torch.tensor(ds.labels)
    tr, te = split(len(dlabels), seed)
    ogen = torch.Generator().manual_seed(seed)
    orig_train = encode_pairs(teacher, make_pairs(ds.images[tr], dlabels[tr], original_pairs[0], ogen), ogen)
    orig_test = encode_pairs(teacher, make_pairs(ds.images[te], dlabels[te], original_pairs[1], ogen), ogen)

    def evaluate() -> dict[str, float]:
        res = {f"acc/rl{t}_at{int(p['s'][0])}": rollout_accuracy(lrm, p) for t, p in test.items()}
        orig = pair_accuracy(lrm, param, orig_test)
        res.update({f"original/{key[4:]}": v for key, v in orig.items() if key.count("/") == 1})
        return res

    before = evaluate()
    log: list[dict] = []

    def record(step: int, logs: dict[str, float]) -> None:
        log.append({"step": step, **logs})
        if step % 50 == 0 or step == steps:
            recent = log[-50:]
            click.echo(f"step {step}/{steps}: rollout loss {sum(r['loss/rollout'] for r in recent) / len(recent):.4f}"
                       f", original loss {sum(r['loss/original'] for r in recent) / len(recent):.4f}", err=True)

    finetune(lrm, batches(train, batch_size, gen), batches(orig_train, batch_size, gen), param,
             steps=steps, lr=lr, seed=seed, log=record)
    after = evaluate()
    report = {
        "generator": str(generator), "rl_steps": list(rl_steps), "timesteps": list(S), "k": k,
        "continuations": continuations, "train_groups_per_step": groups, "test_groups_per_step": test_groups,
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        # How often an independent valuation of a held-out pair agrees with the one that labelled it: the
        # accuracy a model of one valuation can expect (the label noise of the continuations).
        "label_agreement": {f"rl{t}": int(p["agree"].sum()) / len(p["agree"]) for t, p in test.items()},
        "mean_value_gap": {f"rl{t}": p["gap"].mean().item() for t, p in test.items()},
        "held_out_accuracy_before": before, "held_out_accuracy_after": after, "seconds": round(time.time() - t0, 1)}
    if out is not None:
        save_lrm(lrm, out)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return report


@click.command("rollout-reward")
@click.option("--generator", required=True, help="a stage-1 checkpoint folder or run directory")
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path))
@click.option("--groups", default=2000, show_default=True, type=click.IntRange(1, 100_000),
              help="training groups (pairs) per RL step")
@click.option("--test-groups", default=400, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--rl-steps", default="999,749", show_default=True,
              help="the RL steps whose candidates make pairs (stage 2's default: the high-noise steps)")
@click.option("--continuations", default=4, show_default=True, type=click.IntRange(1, 64),
              help="rollouts per candidate for its value")
@click.option("--steps", default=600, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--lr", default=5e-5, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=0, show_default=True)
def main(generator: str, out: Path | None, groups: int, test_groups: int, rl_steps: str, continuations: int,
         steps: int, lr: float, seed: int) -> None:
    """Fine-tune the digits LRM on the generator's own candidates at the RL steps; print held-out accuracy."""
    from trainer.errors import InputError
    from trainer.rl_loop import resolve_init

    try:
        steps_rl = tuple(int(t) for t in rl_steps.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {rl_steps!r}", param_hint="--rl-steps") from None
    try:
        ckpt = resolve_init(generator)
    except InputError as err:
        raise click.BadParameter(str(err).removeprefix("rl.init_from: "), param_hint="--generator") from None
    try:  # from meta.json, before loading anything
        check_rl_steps(steps_rl, json.loads((ckpt / "meta.json").read_text()).get("timesteps") or [])
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--rl-steps") from None
    report = train_rollout_reward(ckpt, out, groups=groups, test_groups=test_groups, rl_steps=steps_rl,
                                  continuations=continuations, steps=steps, lr=lr, seed=seed)
    click.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
