"""Train a Latent Reward Model on preference pairs (shared/reference/lrm_sam.md §A.3).

    python -m trainer.reward_train --base tiny:sdxl --pairs pairs.jsonl --out lrm/ [--steps 1000 ...]

pairs.jsonl, one pair per line (image paths relative to the file unless absolute):
    {"prompt": "a handwritten digit seven", "winner": "w/0001.png", "loser": "l/0001.png"}
    optional "tie": true gives soft labels (0.5, 0.5).
Both images are VAE-encoded with the base pipeline's VAE and noised at one shared t (drawn from
{1, 51, ..., 951}, as LRM does) with independent noise; the loss is the pairwise softmax cross-entropy over
their scores (`lrm_pair_loss`). The UNet's down and mid blocks, the text encoders, the projection and the
logit scale all train. The output folder has the released layout (see trainer/reward.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from trainer.reward import LatentRewardModel, lrm_pair_loss
from trainer.schedules import Parameterisation

LRM_TIMESTEPS: tuple[int, ...] = tuple(range(1, 1000, 50))  # 1, 51, ..., 951


@dataclass
class PrefPair:
    prompt: str
    winner: Path
    loser: Path
    label: float = 1.0  # 1: winner preferred, 0.5: tie


def read_pairs(path: str | Path) -> list[PrefPair]:
    path = Path(path)
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            w, lo = Path(row["winner"]), Path(row["loser"])
            pairs.append(PrefPair(str(row["prompt"]), w if w.is_absolute() else path.parent / w,
                                  lo if lo.is_absolute() else path.parent / lo, 0.5 if row.get("tie") else 1.0))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: expected {{\"prompt\", \"winner\", \"loser\"}}: {err}") from None
    missing = [str(p) for pair in pairs for p in (pair.winner, pair.loser) if not p.exists()]
    if missing:
        raise ValueError(f"{path}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


class PairImages(Dataset):
    def __init__(self, pairs: list[PrefPair], resolution: int) -> None:
        self.pairs, self.resolution = pairs, resolution

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        from trainer.data import to_tensor

        p = self.pairs[i]
        with Image.open(p.winner) as w, Image.open(p.loser) as lo:
            return {"prompt": p.prompt, "winner": to_tensor(w, self.resolution), "loser": to_tensor(lo, self.resolution),
                    "label": torch.tensor(p.label)}


def lrm_pair_step(lrm: LatentRewardModel, lat_w: Tensor, lat_l: Tensor, prompts: Sequence[str], labels: Tensor,
                  param: Parameterisation, generator: torch.Generator,
                  timesteps: Sequence[int] = LRM_TIMESTEPS) -> tuple[Tensor, dict[str, float]]:
    """Noise both clean latents [B, C, H, W] at one shared t per pair (independent noise) and score them."""
    b, dev = lat_w.shape[0], lat_w.device
    t = torch.tensor(timesteps)[torch.randint(len(timesteps), (b,), generator=generator)].to(dev)  # [B]
    z_w = param.add_noise(lat_w, torch.randn(lat_w.shape, generator=generator).to(dev), t)
    z_l = param.add_noise(lat_l, torch.randn(lat_l.shape, generator=generator).to(dev), t)
    text = lrm.encode(list(prompts))
    scores = lrm.score_text(torch.cat([z_w, z_l]), torch.cat([t, t]), text.index(torch.arange(b, device=dev).repeat(2)))
    loss, logs = lrm_pair_loss(scores[:b], scores[b:], labels.to(dev).float())
    logs["lrm/logit_scale"] = float(lrm.logit_scale.detach())
    return loss, logs


def train_lrm(lrm: LatentRewardModel, batches: Iterator[dict], param: Parameterisation, *, steps: int,
              lr: float = 1e-5, weight_decay: float = 0.0, grad_clip: float = 1.0,
              timesteps: Sequence[int] = LRM_TIMESTEPS, seed: int = 0,
              log: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """batches yield {"prompt": [B] str, "winner"/"loser": clean latents [B, C, H, W], "label": [B]}."""
    lrm.train().requires_grad_(True)
    params = [p for p in lrm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(1, steps + 1):
        batch = next(batches)
        loss, logs = lrm_pair_step(lrm, batch["winner"], batch["loser"], batch["prompt"], batch["label"], param,
                                   gen, timesteps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm/lrm"] = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        opt.step()
        history.append(logs)
        if log is not None:
            log(step, logs)
    lrm.eval().requires_grad_(False)
    lrm.trained = True
    return history


@click.command("reward-train")
@click.option("--base", required=True, help="the diffusers pipeline the LRM is built from (folder, hub id, tiny:<family>)")
@click.option("--pairs", "pairs_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--init", "init", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="continue from an LRM folder instead of a fresh one from --base")
@click.option("--steps", default=1000, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--lr", default=1e-5, show_default=True)
@click.option("--resolution", default=None, type=int, help="pixels; default the base pipeline's")
@click.option("--vfe-scale", default=7.5, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(base: str, pairs_path: Path, out: Path, init: Path | None, steps: int, batch_size: int, lr: float,
         resolution: int | None, vfe_scale: float, seed: int) -> None:
    """Train a Latent Reward Model on (prompt, winner image, loser image) pairs."""
    from trainer.data import infinite_batches
    from trainer.jobspec import ModelSpec
    from trainer.models import load_teacher
    from trainer.reward import load_lrm, save_lrm

    try:
        pairs = read_pairs(pairs_path)
    except ValueError as err:
        click.echo(f"error: --pairs: {err}", err=True)
        sys.exit(2)
    torch.manual_seed(seed)
    teacher = load_teacher(ModelSpec(teacher=base, resolution=resolution))
    if init is not None:
        lrm = load_lrm(init, base=teacher.pipe, resolution=teacher.resolution, vfe_scale=vfe_scale)
    else:
        lrm = LatentRewardModel.from_pipeline(teacher.pipe, resolution=teacher.resolution, vfe_scale=vfe_scale, seed=seed)
    lrm.to(teacher.device)
    images = infinite_batches(PairImages(pairs, teacher.resolution), batch_size, seed)

    def latents() -> Iterator[dict]:
        for b in images:
            yield {"prompt": list(b["prompt"]), "winner": teacher.encode_images(b["winner"].to(teacher.device)),
                   "loser": teacher.encode_images(b["loser"].to(teacher.device)), "label": b["label"]}

    out.mkdir(parents=True, exist_ok=True)
    with (out / "train_log.jsonl").open("w") as f:
        def log(step: int, logs: dict[str, float]) -> None:
            f.write(json.dumps({"step": step, **logs}) + "\n")
            if step % 50 == 0 or step == steps:
                click.echo(f"step {step}/{steps}: loss {logs['loss/lrm']:.4f} acc {logs['lrm/pair_acc']:.2f}", err=True)

        train_lrm(lrm, latents(), teacher.param, steps=steps, lr=lr, seed=seed, log=log)
    save_lrm(lrm, out)
    click.echo(f"wrote {out}", err=True)


if __name__ == "__main__":
    main()
