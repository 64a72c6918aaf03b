"""How well can *any* reward model rank the toy LRM's held-out pairs at high noise? A Gaussian oracle bound.

The study asked for held-out pair accuracy >= 0.75 at t = 999 and >= 0.90 at t = 749, or evidence that the noise
makes it impossible on digits. The pairs are those of `trainer/toy/reward.py`: winner a real digit of class c,
loser a real digit of another class or the winner blurred, noised or half-erased; both latents are noised at the
same t with independent noise, x_t = a_t x0 + s_t eps. At t = 999, a_t^2 = alpha_bar = 0.0047: the clean latent
contributes 0.5% of the variance, so the law of x_t given "a real digit of class c" is a Gaussian convolved with
a Gaussian 200x wider, and is itself Gaussian to a very good approximation: N(a mu_c, a^2 Sigma_c + s^2 I).

The oracle fits mu and Sigma (shrunk towards the diagonal: 256 dims, ~144 digits per class) to the VAE latents
of the *training* digits, for the winners of each class and for each kind of loser (wrong_class: the mixture of
the other nine classes), and ranks a held-out pair by the log-likelihood ratio log p(z|winner) - log p(z|loser),
told which kind of loser the pair has. Given the pair kind this is the Bayes decision under the Gaussian law, so
where that law is accurate (high noise: t >= 749, where noise is >= 94% of the variance) its accuracy bounds
every reward model, which must score each latent alone and without the kind. At low noise the clean latents'
non-Gaussian shape matters and a trained model can beat it (the shipped LRM does at t = 249): there the number is
no bound. Reported per t and per kind, with the shipped LRM's accuracy (trainer/toy/digits_reward/report.json).

    python bench/lrm_ceiling.py            # writes bench/results/lrm_ceiling.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from _common import REPO, command_line, format_table, machine_info, write_json
from torch import Tensor

RESULTS = REPO / "bench" / "results"
TIMESTEPS = (1, 249, 499, 749, 999)
KINDS = ("wrong_class", "blur", "noise", "erase")


def gaussian(x: Tensor, shrink: float) -> tuple[Tensor, Tensor]:
    """Mean [D] and covariance [D, D] (float64) of rows of x, shrunk: (1 - g) S + g diag(S)."""
    x = x.double().flatten(1)
    mu = x.mean(0)
    s = torch.cov(x.T)
    return mu, (1 - shrink) * s + shrink * torch.diag(torch.diag(s))


def noisy_logpdf(z: Tensor, mu: Tensor, cov: Tensor, a: float, s: float) -> Tensor:
    """log N(z; a mu, a^2 cov + s^2 I) for rows of z [N, D]."""
    d = mu.shape[0]
    c = a * a * cov + s * s * torch.eye(d, dtype=torch.float64)
    return torch.distributions.MultivariateNormal(a * mu, covariance_matrix=c).log_prob(z.double())


def mixture_logpdf(z: Tensor, comps: list[tuple[Tensor, Tensor]], a: float, s: float) -> Tensor:
    logs = torch.stack([noisy_logpdf(z, mu, cov, a, s) for mu, cov in comps])
    return torch.logsumexp(logs, 0) - math.log(len(comps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--test-pairs", type=int, default=2000)
    ap.add_argument("--draws", type=int, default=5, help="independent noise draws per pair and t")
    ap.add_argument("--shrink", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "lrm_ceiling"))
    args = ap.parse_args()
    torch.set_num_threads(1)

    from trainer.data import DigitsDataset
    from trainer.jobspec import ModelSpec
    from trainer.models import load_teacher
    from trainer.toy import HERE, TEACHER_DIR
    from trainer.toy.prompts import digit_prompt
    from trainer.toy.reward import degrade, encode_pairs, make_pairs, split

    teacher = load_teacher(ModelSpec(teacher=str(TEACHER_DIR)))
    ds = DigitsDataset(teacher.resolution)
    labels = torch.tensor(ds.labels)
    tr, te = split(len(labels), args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    def enc(x: Tensor) -> Tensor:
        return torch.cat([teacher.encode_images(c, gen) for c in x.split(256)]).flatten(1)

    # Training-split latents: real digits and each degradation of them (the loser laws).
    real_imgs, real_lab = ds.images[tr], labels[tr]
    lat = {"real": enc(real_imgs)}
    for kind in KINDS[1:]:
        lat[kind] = enc(torch.stack([degrade(im, kind, gen) for im in real_imgs]))
    classes = sorted(real_lab.unique().tolist())
    fit = {(k, c): gaussian(lat[k][real_lab == c], args.shrink) for k in lat for c in classes}

    test = encode_pairs(teacher, make_pairs(ds.images[te], labels[te], args.test_pairs, gen), gen)
    w, lo = test["winner"].flatten(1), test["loser"].flatten(1)
    by_prompt = {digit_prompt(c): c for c in classes}
    cls = torch.tensor([by_prompt[p] for p in test["prompt"]])
    kinds = list(test["kind"])
    alpha_bar = teacher.param.alphas_cumprod.double()

    out: dict[str, dict[str, float]] = {}
    for t in TIMESTEPS:
        a, s = math.sqrt(float(alpha_bar[t])), math.sqrt(1 - float(alpha_bar[t]))
        correct = torch.zeros(len(kinds))
        for _ in range(args.draws):
            zw = a * w.double() + s * torch.randn(w.shape, generator=gen, dtype=torch.float64)
            zl = a * lo.double() + s * torch.randn(lo.shape, generator=gen, dtype=torch.float64)
            for c in classes:
                for kind in KINDS:
                    m = torch.tensor([(int(ci) == c and k == kind) for ci, k in zip(cls, kinds, strict=True)])
                    if not m.any():
                        continue
                    win_law = [fit[("real", c)]]
                    lose_law = ([fit[("real", o)] for o in classes if o != c] if kind == "wrong_class"
                                else [fit[(kind, c)]])
                    llr_w = mixture_logpdf(zw[m], win_law, a, s) - mixture_logpdf(zw[m], lose_law, a, s)
                    llr_l = mixture_logpdf(zl[m], win_law, a, s) - mixture_logpdf(zl[m], lose_law, a, s)
                    correct[m] += (llr_w > llr_l).double()
        acc = correct / args.draws
        row = {"all": float(acc.mean()), "alpha_bar": float(alpha_bar[t])}
        for kind in KINDS:
            row[kind] = float(acc[torch.tensor([k == kind for k in kinds])].mean())
        out[f"t{t}"] = row
        print(f"t={t}: oracle accuracy {row['all']:.3f} " + " ".join(f"{k} {row[k]:.3f}" for k in KINDS), flush=True)

    report = json.loads((HERE / "digits_reward" / "report.json").read_text())
    lrm = report.get("held_out_accuracy_after", {})
    rows = [[t, f"{v['alpha_bar']:.4f}", f"{v['all']:.3f}", *[f"{v[k]:.3f}" for k in KINDS],
             f"{lrm[f'acc/{t}']:.3f}" if f"acc/{t}" in lrm else "-"] for t, v in out.items()]
    md = "\n".join([
        "# Pair accuracy ceiling of the toy LRM's held-out pairs (Gaussian oracle)", "",
        f"Command: `{command_line()}`", "",
        f"{args.test_pairs} held-out pairs x {args.draws} noise draws per t; the oracle knows each pair's loser "
        "kind. Where noise dominates (t >= 749) the Gaussian law is accurate and the oracle bounds any reward model "
        "from above; at low t it is no bound (a trained LRM beats it at t = 249). See the script's docstring.", "",
        format_table(["t", "alpha_bar", "oracle (all kinds)", *KINDS, "shipped LRM"], rows), ""])
    write_json(f"{args.out}.json", {"command": command_line(), "machine": machine_info(), "settings": vars(args),
                                    "oracle_accuracy": out, "shipped_lrm_accuracy": lrm})
    with open(f"{args.out}.md", "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
