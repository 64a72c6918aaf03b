"""The toy reward: a noise-aware Latent Reward Model for the digits teacher, trained by our code.

    python -m trainer.toy.reward --teacher trainer/toy/digits_teacher --out trainer/toy/digits_reward

Preference pairs (our design). Every pair has the prompt "a handwritten digit <c>" and:
- winner: a real digit of class c (sklearn's digits, upsampled as `DigitsDataset` does);
- loser, one of four kinds, drawn uniformly:
  * `wrong_class`: a real digit of another class (text alignment);
  * `blur`: the same winner image pooled to 4x4 and upsampled back (detail / fidelity);
  * `noise`: the winner plus Gaussian pixel noise, std 0.5 on the [-1, 1] scale, clamped (artifacts);
  * `erase`: the winner with a random half (top/bottom/left/right) set to the background (structure).
Images are VAE-encoded with the teacher's own VAE, then, as LRM trains, both latents of a pair are noised at one
shared t from {1, 51, ..., 951} with independent noise, and the pairwise softmax loss is minimised
(`trainer.reward_train.train_lrm`). The LRM starts from the teacher's own UNet and text encoders.
Held-out: a seeded 80/20 split of the 1797 digits by index; the report gives pair accuracy per timestep and per
loser kind on pairs built from held-out digits only. At t near 999 the latent is almost pure noise, so accuracy
there is expected to approach chance; the RL timesteps score candidates at s = 749 or 499 (K = 4).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.data import DigitsDataset
from trainer.reward import LatentRewardModel, save_lrm
from trainer.reward_train import LRM_TIMESTEPS, train_lrm
from trainer.toy.prompts import digit_prompt

if TYPE_CHECKING:
    from trainer.models import Teacher
    from trainer.schedules import Parameterisation

LOSER_KINDS = ("wrong_class", "blur", "noise", "erase")
EVAL_TIMESTEPS = (1, 249, 499, 749, 999)


def split(n: int, seed: int = 0, test_frac: float = 0.2) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * test_frac))
    return perm[k:].sort().values, perm[:k].sort().values


def degrade(img: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    """img [3, R, R] in [-1, 1] -> a worse image of the same digit."""
    r = img.shape[-1]
    if kind == "blur":
        return F.interpolate(F.adaptive_avg_pool2d(img[None], 4), size=(r, r), mode="bilinear", align_corners=False)[0]
    if kind == "noise":
        return (img + 0.5 * torch.randn(img.shape, generator=gen)).clamp(-1, 1)
    if kind == "erase":
        out, h = img.clone(), r // 2
        side = int(torch.randint(4, (1,), generator=gen))
        region = [(slice(0, h), slice(None)), (slice(h, None), slice(None)),
                  (slice(None), slice(0, h)), (slice(None), slice(h, None))][side]
        out[:, region[0], region[1]] = -1.0  # the digits' background
        return out
    raise ValueError(f"unknown degradation {kind!r}")


def make_pairs(images: Tensor, labels: Tensor, n: int, gen: torch.Generator,
               kinds: Sequence[str] = LOSER_KINDS) -> dict:
    """n pairs from the given digits: {"prompt", "winner" [n, 3, R, R], "loser", "kind", "label" [n]}."""
    by_class = {c: (labels == c).nonzero().flatten() for c in labels.unique().tolist()}
    prompts, winners, losers, kind_names = [], [], [], []
    for _ in range(n):
        i = int(torch.randint(len(labels), (1,), generator=gen))
        c, kind = int(labels[i]), kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
        if kind == "wrong_class":
            other = [k for k in by_class if k != c]
            pool = by_class[other[int(torch.randint(len(other), (1,), generator=gen))]]
            loser = images[pool[int(torch.randint(len(pool), (1,), generator=gen))]]
        else:
            loser = degrade(images[i], kind, gen)
        prompts.append(digit_prompt(c))
        winners.append(images[i])
        losers.append(loser)
        kind_names.append(kind)
    return {"prompt": prompts, "winner": torch.stack(winners), "loser": torch.stack(losers), "kind": kind_names,
            "label": torch.ones(n)}


def encode_pairs(teacher: Teacher, pairs: dict, gen: torch.Generator, chunk: int = 256) -> dict:
    def enc(x: Tensor) -> Tensor:
        return torch.cat([teacher.encode_images(x[i:i + chunk].to(teacher.device), gen) for i in range(0, len(x), chunk)])

    return {**pairs, "winner": enc(pairs["winner"]), "loser": enc(pairs["loser"])}


def batches(pairs: dict, batch_size: int, gen: torch.Generator) -> Iterator[dict]:
    """Endless shuffled batches of a pair dict: every field (tensors and lists alike) indexed by the same rows."""
    n = len(pairs["prompt"])
    while True:
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            yield {key: v[idx] if isinstance(v, Tensor) else [v[i] for i in idx] for key, v in pairs.items()}


@torch.no_grad()
def pair_accuracy(lrm: LatentRewardModel, param: Parameterisation, pairs: dict,
                  timesteps: Sequence[int] = EVAL_TIMESTEPS,
                  seed: int = 1, chunk: int = 128) -> dict[str, float]:
    """Fraction of pairs where the winner outscores the loser, both noised at t (independent noise)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, float] = {}
    kinds = list(pairs["kind"])
    for t in timesteps:
        wins = []
        for i in range(0, len(kinds), chunk):
            w, lo = pairs["winner"][i:i + chunk], pairs["loser"][i:i + chunk]
            tt = torch.full((len(w),), t, dtype=torch.long, device=w.device)
            zw = param.add_noise(w, torch.randn(w.shape, generator=gen).to(w.device), tt)
            zl = param.add_noise(lo, torch.randn(lo.shape, generator=gen).to(lo.device), tt)
            p = pairs["prompt"][i:i + chunk]
            wins.append((lrm.score(zw, tt, p) > lrm.score(zl, tt, p)).cpu())
        won = torch.cat(wins)
        out[f"acc/t{t}"] = won.float().mean().item()
        for k in sorted(set(kinds)):
            mask = torch.tensor([x == k for x in kinds])
            out[f"acc/t{t}/{k}"] = won[mask].float().mean().item()
    return out


def parse_timesteps(text: str) -> tuple[int, ...]:
    """'lrm' -> LRM's 1, 51, ..., 951; 'lrm+999' -> those and 999 (the K-step sampler's first step, which LRM's
    grid never reaches); or an explicit comma-separated list."""
    base, _, extra = text.partition("+")
    ts = list(LRM_TIMESTEPS) if base.strip() == "lrm" else [int(t) for t in base.split(",") if t.strip()]
    ts += [int(t) for t in extra.split(",") if t.strip()]
    if not ts or any(not 0 <= t <= 999 for t in ts):
        raise ValueError(f"timesteps: expected 'lrm', 'lrm+999' or integers in [0, 999], got {text!r}")
    return tuple(sorted(set(ts)))


def train_toy_reward(teacher_ref: str, out: str | Path | None, *, steps: int = 600, batch_size: int = 32,
                     lr: float = 1e-4, train_pairs: int = 4000, test_pairs: int = 800, seed: int = 0,
                     log_every: int = 50, timesteps: Sequence[int] = LRM_TIMESTEPS) -> dict:
    """Build pairs, train the LRM from the teacher, evaluate on held-out pairs; saves to `out` when given.
    timesteps: the training noise levels (drawn uniformly per pair)."""
    from trainer.jobspec import ModelSpec
    from trainer.models import load_teacher

    torch.manual_seed(seed)
    t0 = time.time()
    teacher = load_teacher(ModelSpec(teacher=teacher_ref))
    ds = DigitsDataset(teacher.resolution)
    labels = torch.tensor(ds.labels)
    tr, te = split(len(labels), seed)
    gen = torch.Generator().manual_seed(seed)
    train = encode_pairs(teacher, make_pairs(ds.images[tr], labels[tr], train_pairs, gen), gen)
    test = encode_pairs(teacher, make_pairs(ds.images[te], labels[te], test_pairs, gen), gen)
    lrm = LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution, seed=seed).to(teacher.device)
    before = pair_accuracy(lrm, teacher.param, test)
    log: list[dict] = []

    def record(step: int, logs: dict[str, float]) -> None:
        log.append({"step": step, **logs})
        if step % log_every == 0 or step == steps:
            recent = log[-log_every:]
            click.echo(f"step {step}/{steps}: loss {sum(r['loss/lrm'] for r in recent) / len(recent):.4f}", err=True)

    train_lrm(lrm, batches(train, batch_size, gen), teacher.param, steps=steps, lr=lr, seed=seed,
              timesteps=timesteps, log=record)
    after = pair_accuracy(lrm, teacher.param, test)
    report = {"teacher": teacher_ref, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_pairs": train_pairs, "test_pairs": test_pairs, "loser_kinds": list(LOSER_KINDS),
              "train_timesteps": list(timesteps), "held_out_accuracy_before": before,
              "held_out_accuracy_after": after, "seconds": round(time.time() - t0, 1)}
    if out is not None:
        out = Path(out)
        save_lrm(lrm, out)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return report


@click.command("toy-reward")
@click.option("--teacher", "teacher_ref", default=None, help="default: the shipped digits teacher")
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", default=600, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--timesteps", default="lrm", show_default=True,
              help="training noise levels: lrm (1, 51, ..., 951), lrm+999, or a comma-separated list")
def main(teacher_ref: str | None, out: Path | None, steps: int, batch_size: int, lr: float, seed: int,
         timesteps: str) -> None:
    """Train the digits Latent Reward Model and print its held-out pair accuracy."""
    from trainer.toy import HERE, TEACHER_DIR

    try:
        ts = parse_timesteps(timesteps)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--timesteps") from None
    report = train_toy_reward(teacher_ref or str(TEACHER_DIR), out or HERE / "digits_reward", steps=steps,
                              batch_size=batch_size, lr=lr, seed=seed, timesteps=ts)
    click.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
