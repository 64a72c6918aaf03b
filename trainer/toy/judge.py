"""An independent judge for the RL study: trained only on the held-out digits, never part of any reward.

The RL study's reward (`digits_reward_rollout`) is fine-tuned from the judge that also scores it (`digits_reward`),
both starting from the teacher's UNet, so "the judge's score rises" is close to in-sample. This judge shares
nothing with them: an image-space CNN (`evaluate.DigitsCNN` at width 48, not the evaluator's 32), its own seed
(1), trained on the 360 held-out digits only (`evaluate.split_indices`' test part), on pairs of the reward's four
loser kinds (`reward.make_pairs`: wrong class, blur, pixel noise, half erased) with the Bradley-Terry loss
-log sigmoid(s(winner) - s(loser)) (the pairwise softmax of the LRM, Eq. 12 of the paper, on two candidates),
where the score s(x, c) is the CNN's logit of the prompted digit c. Its own check: pair accuracy on pairs built
from the train-split digits, which it never saw.

    python -m trainer.toy.judge --out trainer/toy/digits_judge_independent
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.toy import HERE
from trainer.toy.evaluate import DigitsCNN, augment, real_digits, split_indices

JUDGE_DIR = HERE / "digits_judge_independent"
WIDTH = 48
SEED = 1


class IndependentJudge:
    """score(images [N, 3, 32, 32] in [-1, 1], labels [N]) -> [N]: the logit of the prompted digit."""

    def __init__(self, model: DigitsCNN, meta: dict | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path = JUDGE_DIR) -> IndependentJudge:
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "config.json").read_text())
        model = DigitsCNN(width=meta["width"])
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return cls(model, meta)

    @torch.no_grad()
    def score(self, images: Tensor, labels: Tensor, batch: int = 500) -> Tensor:
        labels = torch.as_tensor(labels)
        out = [self.model(x.float().clamp(-1, 1)) for x in images.split(batch)]
        return torch.cat(out).gather(1, labels.view(-1, 1)).squeeze(1)


def _pairs(images: Tensor, labels: Tensor, n: int, gen: torch.Generator) -> dict[str, Tensor]:
    """`reward.make_pairs` with "label" the prompted digit (make_pairs' own "label" is the preference target)."""
    from trainer.toy.prompts import digit_prompt
    from trainer.toy.reward import make_pairs

    pairs = make_pairs(images, labels, n, gen)
    digit = {digit_prompt(c): c for c in range(10)}
    return {**pairs, "label": torch.tensor([digit[p] for p in pairs["prompt"]])}


def pair_accuracy(judge: IndependentJudge, pairs: dict[str, Tensor]) -> float:
    sw = judge.score(pairs["winner"], pairs["label"])
    sl = judge.score(pairs["loser"], pairs["label"])
    return float((sw > sl).float().mean())


def train_judge(out: Path = JUDGE_DIR, steps: int = 400, batch: int = 64, lr: float = 2e-3, seed: int = SEED,
                test_pairs: int = 800) -> dict[str, Any]:
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images, labels = real_digits()
        tr, te = split_indices(labels)
        gen = torch.Generator().manual_seed(seed)
        model = DigitsCNN(width=WIDTH)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        t0 = time.monotonic()
        model.train()
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            p = _pairs(images[te], labels[te], batch, gen)
            w, lo = augment(p["winner"], gen), augment(p["loser"], gen)
            logits = model(torch.cat([w, lo]))
            lab = torch.cat([p["label"], p["label"]])
            s = logits.gather(1, lab.view(-1, 1)).squeeze(1)
            loss = -F.logsigmoid(s[:batch] - s[batch:]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        judge = IndependentJudge(model)
        check = _pairs(images[tr], labels[tr], test_pairs, torch.Generator().manual_seed(seed + 100))
        meta = {"width": WIDTH, "seed": seed, "steps": steps, "batch": batch, "lr": lr,
                "trained_on": f"held-out split ({len(te)} digits)", "final_loss": float(loss),
                "pair_accuracy_on_train_split_pairs": pair_accuracy(judge, check), "test_pairs": test_pairs,
                "minutes": (time.monotonic() - t0) / 60}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=JUDGE_DIR)
    ap.add_argument("--steps", type=int, default=400)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(train_judge(a.out, a.steps), indent=2))
