"""Flash-DMD losses as small pure functions of tensors (DESIGN §3, §6).

Each returns (loss, logs) where logs holds detached floats for the sink. The
equation numbers refer to the Flash-DMD paper (shared/paper/flash-dmd.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Logs = dict[str, float]


def dm_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> tuple[Tensor, Logs]:
    """Distribution-matching loss whose gradient is the DMD direction, Eq. (4).

    x:       the generator's x0 estimate, carrying grad        [B, C, H, W]
    x0_real: the teacher's (CFG) x0 estimate of noised x       [B, C, H, W]
    x0_fake: the fake score's x0 estimate of the same x_t      [B, C, H, W]

    Eq. (4) writes the gradient as -(s_real - s_fake) dG/dtheta. With
    s = -(x_t - a_t mu)/sigma_t^2 the score difference is proportional to
    (x0_real - x0_fake). DMD2 normalises it per sample by mean|x - x0_real|:
        g = (x0_fake - x0_real) / mean_{C,H,W} |x - x0_real|
    and realises it as L = 0.5 * mean((x - sg(x - g))^2), so dL/dx = g / numel.
    """
    with torch.no_grad():
        x64, real, fake = x.double(), x0_real.double(), x0_fake.double()
        p_real = x64 - real  # [B, C, H, W]
        p_fake = x64 - fake
        weight = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)  # [B, 1, 1, 1]
        grad = torch.nan_to_num((p_real - p_fake) / weight, nan=0.0, posinf=0.0, neginf=0.0)  # [B, C, H, W]
        target = (x64 - grad).to(x.dtype)
    loss = 0.5 * F.mse_loss(x.float(), target.float(), reduction="mean")
    return loss, {"loss/dm": loss.item(), "dm/grad_norm": grad.norm().item() / x.shape[0] ** 0.5}


def diffusion_loss(pred: Tensor, target: Tensor) -> tuple[Tensor, Logs]:
    """The fake score's denoising loss, Eq. (6): ||mu_fake(x_t, t) - eps||^2 (mean).

    pred, target: [B, C, H, W]; target is eps for eps models, eps - x0 for flow models.
    """
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    return loss, {"loss/fake_score": loss.item()}


def gan_d_hinge(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Logs]:
    """Discriminator hinge loss, Alg. 1 line 25: E[relu(1 - D(real))] + E[relu(1 + D(fake))].

    real_logits, fake_logits: [B, N] (N logits per sample from all heads).
    """
    loss_real = F.relu(1 - real_logits.float()).mean()
    loss_fake = F.relu(1 + fake_logits.float()).mean()
    loss = loss_real + loss_fake
    return loss, {"loss/disc": loss.item(), "disc/real_logit": real_logits.mean().item(),
                  "disc/fake_logit": fake_logits.mean().item()}


def gan_g_hinge(fake_logits: Tensor) -> tuple[Tensor, Logs]:
    """Generator hinge loss (the partner of Alg. 1 line 25): -E[D(G(.))].  fake_logits: [B, N]."""
    loss = -fake_logits.float().mean()
    return loss, {"loss/gen_adv": loss.item()}


def gan_d_logistic(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Logs]:
    """Eq. (10): E[-log D(real)] + E[-log(1 - D(fake))] with D = sigmoid(logit).

    -log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l).
    (Eq. (10) is printed with the fake term's sign loosely; this is the standard
    non-saturating form DMD2 uses, confirmed in its issue #26.)
    """
    loss_real = F.softplus(-real_logits.float()).mean()
    loss_fake = F.softplus(fake_logits.float()).mean()
    loss = loss_real + loss_fake
    return loss, {"loss/disc": loss.item(), "disc/real_logit": real_logits.mean().item(),
                  "disc/fake_logit": fake_logits.mean().item()}


def gan_g_logistic(fake_logits: Tensor) -> tuple[Tensor, Logs]:
    """Non-saturating generator loss for Eq. (5)/(9): E[-log D(G(.))] = E[softplus(-l)]."""
    loss = F.softplus(-fake_logits.float()).mean()
    return loss, {"loss/gen_adv": loss.item()}


GAN_LOSSES = {"hinge": (gan_d_hinge, gan_g_hinge), "logistic": (gan_d_logistic, gan_g_logistic)}


def matching_parameters(dst: nn.Module, src: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """Pairs (psi, theta) with the same name and shape; for LoRA only the adapters differ."""
    src_params = dict(src.named_parameters())
    pairs = []
    for name, p in dst.named_parameters():
        q = src_params.get(name)
        if q is not None and q.shape == p.shape:
            pairs.append((p, q))
    return pairs


@torch.no_grad()
def ema_inject_(pairs: Iterable[tuple[Tensor, Tensor]], lam: float) -> int:
    """EMA injection, Eq. (11): psi <- lam * psi + (1 - lam) * theta, in place.

    pairs: (psi, theta) tensors of equal shape, e.g. from `matching_parameters`.
    Returns how many tensors were updated.
    """
    n = 0
    for psi, theta in pairs:
        psi.mul_(lam).add_(theta.detach().to(psi.dtype), alpha=1 - lam)
        n += 1
    return n


# ------------------------------------------------------------------ stage 2: preference optimisation (Sec. 3.4)

def gaussian_log_density(z: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log p(z_s | z_t, c) of the sampler's transition, the p_* of Eq. (13), averaged over elements.

    The few-step (LCM/DMD2) transition is z_s = a_s * x0(z_t) + std_s * eps, i.e. the Gaussian
    N(a_s x0, std_s^2 I): eps models a_s = sqrt(abar_s), std_s^2 = 1 - abar_s; flow models a_s = 1 - sigma_s,
    std_s = sigma_s. The per-element mean (not the sum) follows LPO, so beta = 500 keeps its meaning.

    z:    the next latent z_s                 [B, C, H, W]
    mean: a_s * x0_theta(z_t, t, c)           [B, C, H, W]
    std:  std_s (> 0)                         [B] or scalar
    returns                                   [B]  (float64: beta * H is sensitive to rounding)
    """
    z64, m64 = z.double(), mean.double()
    s = torch.as_tensor(std, dtype=torch.float64, device=z.device).reshape(-1, *([1] * (z.ndim - 1)))
    elem = -0.5 * ((z64 - m64) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)  # [B, C, H, W]
    return elem.flatten(1).mean(dim=1)


def dpo_loss(logp_w: Tensor, logp_ref_w: Tensor, logp_l: Tensor, logp_ref_l: Tensor, beta: float,
             ratio_clip: float | None = None) -> tuple[Tensor, Logs]:
    """Step-wise DPO, Eq. (12)-(13): L = -E[log sigmoid(beta * H(w, l))],

        H(w, l) = log p_theta(w)/p_ref(w) - log p_theta(l)/p_ref(l).

    All inputs are per-pair log-densities [P] (from `gaussian_log_density`); the ref terms carry no grad.
    ratio_clip (LPO/SPO, optional): clamp each ratio exp(log-ratio) to [1 - c, 1 + c] before the log, so
    the gradient vanishes once a ratio leaves that band. At initialisation (policy = reference) H = 0 and
    L = log 2.
    """
    lr_w = logp_w - logp_ref_w.detach()  # [P]
    lr_l = logp_l - logp_ref_l.detach()  # [P]
    if ratio_clip is not None:
        lo, hi = math.log1p(-ratio_clip), math.log1p(ratio_clip)
        lr_w, lr_l = lr_w.clamp(lo, hi), lr_l.clamp(lo, hi)
    h = lr_w - lr_l  # [P]
    loss = -F.logsigmoid(beta * h).mean()
    return loss, {"loss/rl": loss.item(), "rl/H": h.mean().item(), "rl/logratio_w": lr_w.mean().item(),
                  "rl/logratio_l": lr_l.mean().item(), "rl/implicit_acc": (h > 0).double().mean().item()}
