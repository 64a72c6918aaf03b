"""Unit tests for trainer/losses.py on tiny hand-worked tensors.

Expected numbers are derived by hand in the comments; nothing is computed by the code under test.
Paper: shared/paper/flash-dmd.md (Eq. 4, 6, 10, 11; Alg. 1 line 25). DMD2 facts: shared/reference/dmd2.md §1, §3.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.losses import (
    GAN_LOSSES,
    diffusion_loss,
    dm_loss,
    ema_inject_,
    gan_d_hinge,
    gan_d_logistic,
    gan_g_hinge,
    gan_g_logistic,
    matching_parameters,
)


def _bchw(*samples: list[float]) -> torch.Tensor:
    """Samples of two pixels each -> [B, C=1, H=1, W=2]."""
    return torch.tensor(samples, dtype=torch.float32).reshape(len(samples), 1, 1, 2)


def _close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected.reshape(actual.shape), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# dm_loss, Eq. (4) with DMD2's per-sample normalisation (dmd2.md §1.6-1.7)
# ---------------------------------------------------------------------------------------------
#
#   sample 0: x = [1, 2], x0_real = [0, -1], x0_fake = [2, -5]
#             |x - real| = [1, 3]      -> mean 2
#             fake - real = [2, -4]    -> g0 = [1, -2]
#   sample 1: x = [3, 4], x0_real = [4, 4], x0_fake = [5, 4.25]
#             |x - real| = [1, 0]      -> mean 0.5
#             fake - real = [1, 0.25]  -> g1 = [2, 0.5]
#   (a batch-wide mean would be 1.25 and give different g, so this also checks "per sample")
#   loss = 0.5 * mean(g^2) = 0.5 * (1 + 4 + 4 + 0.25) / 4 = 1.15625
#   dL/dx = g / numel = g / 4 = [[0.25, -0.5], [0.5, 0.125]]
#   logs["dm/grad_norm"] = ||g|| / sqrt(B) = sqrt(9.25 / 2)

X = ([1.0, 2.0], [3.0, 4.0])
X0_REAL = ([0.0, -1.0], [4.0, 4.0])
X0_FAKE = ([2.0, -5.0], [5.0, 4.25])


def test_dm_loss_value_and_gradient_by_hand() -> None:
    x = _bchw(*X).requires_grad_(True)
    loss, logs = dm_loss(x, _bchw(*X0_REAL), _bchw(*X0_FAKE))
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(1.15625, abs=1e-6)
    loss.backward()
    _close(x.grad, [[0.25, -0.5], [0.5, 0.125]])
    assert logs["loss/dm"] == pytest.approx(1.15625, abs=1e-6)
    assert logs["dm/grad_norm"] == pytest.approx(math.sqrt(9.25 / 2), abs=1e-6)


def test_dm_loss_gradient_points_from_fake_towards_real() -> None:
    # A gradient step x - lr * dL/dx must move x towards x0_real and away from x0_fake.
    # Sample 0 above: grad [0.25, -0.5]; x0_fake - x0_real = [2, -4] has the same signs.
    x = _bchw(*X).requires_grad_(True)
    real, fake = _bchw(*X0_REAL), _bchw(*X0_FAKE)
    dm_loss(x, real, fake)[0].backward()
    assert torch.all(x.grad * (fake - real) >= 0)
    assert torch.all((x.grad * (fake - real)).flatten(1).sum(1) > 0)


def test_dm_loss_zero_when_real_equals_fake() -> None:
    # x0_fake == x0_real -> g = 0 -> loss 0, zero gradient.
    x = _bchw(*X).requires_grad_(True)
    loss, _ = dm_loss(x, _bchw(*X0_REAL), _bchw(*X0_REAL))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_dm_loss_nan_direction_becomes_zero() -> None:
    # Sample 0: x == x0_real == x0_fake -> weight 0 and g = 0/0 = NaN -> zeroed.
    # Sample 1 as above: g1 = [2, 0.5].  loss = 0.5 * (0 + 0 + 4 + 0.25) / 4 = 0.53125,
    # grad = [[0, 0], [0.5, 0.125]].
    x = _bchw([1.0, 2.0], [3.0, 4.0]).requires_grad_(True)
    real = _bchw([1.0, 2.0], [4.0, 4.0])
    fake = _bchw([1.0, 2.0], [5.0, 4.25])
    loss, logs = dm_loss(x, real, fake)
    loss.backward()
    assert loss.item() == pytest.approx(0.53125, abs=1e-6)
    _close(x.grad, [[0.0, 0.0], [0.5, 0.125]])
    assert math.isfinite(logs["dm/grad_norm"])


def test_dm_loss_inf_direction_becomes_zero() -> None:
    # Sample 0: x == x0_real = [1, 2] (weight mean|0| = 0) but x0_fake = [2, 2]:
    #   g0 = [1, 0] / 0 = [inf, NaN] -> must become [0, 0] (weight 0: no DM signal for that sample).
    # Sample 1 as above: g1 = [2, 0.5].  loss = 0.5 * (4 + 0.25) / 4 = 0.53125, grad [[0, 0], [0.5, 0.125]].
    x = _bchw([1.0, 2.0], [3.0, 4.0]).requires_grad_(True)
    real = _bchw([1.0, 2.0], [4.0, 4.0])
    fake = _bchw([2.0, 2.0], [5.0, 4.25])
    loss, _ = dm_loss(x, real, fake)
    loss.backward()
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(0.53125, abs=1e-6)
    _close(x.grad, [[0.0, 0.0], [0.5, 0.125]])


def test_dm_loss_does_not_backprop_into_score_estimates() -> None:
    x = _bchw(*X).requires_grad_(True)
    real = _bchw(*X0_REAL).requires_grad_(True)
    fake = _bchw(*X0_FAKE).requires_grad_(True)
    loss, _ = dm_loss(x, real, fake)
    loss.backward()
    assert real.grad is None and fake.grad is None
    assert x.grad is not None
    # Only x is an input of the graph: the gradient w.r.t. (real, fake) is unreachable.
    with pytest.raises(RuntimeError):
        torch.autograd.grad(dm_loss(x, real, fake)[0], [real, fake])


def test_dm_loss_inputs_unchanged() -> None:
    x, real, fake = _bchw(*X), _bchw(*X0_REAL), _bchw(*X0_FAKE)
    copies = [t.clone() for t in (x, real, fake)]
    dm_loss(x.requires_grad_(True), real, fake)
    for t, c in zip((x, real, fake), copies, strict=True):
        assert torch.equal(t.detach(), c)


# ---------------------------------------------------------------------------------------------
# diffusion_loss, Eq. (6)
# ---------------------------------------------------------------------------------------------

def test_diffusion_loss_is_mse_by_hand() -> None:
    # pred = [1, 2, 3, 4], target = [0, 0, 3, 6] -> squared errors [1, 4, 0, 4] -> mean 9/4 = 2.25.
    # d/dpred = 2 (pred - target) / 4 = [0.5, 1, 0, -1].
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2).requires_grad_(True)
    target = torch.tensor([0.0, 0.0, 3.0, 6.0]).reshape(1, 1, 2, 2)
    loss, logs = diffusion_loss(pred, target)
    assert loss.item() == pytest.approx(2.25, abs=1e-6)
    assert logs["loss/fake_score"] == pytest.approx(2.25, abs=1e-6)
    loss.backward()
    _close(pred.grad, [0.5, 1.0, 0.0, -1.0])


def test_diffusion_loss_in_float32_for_bf16_inputs() -> None:
    # Same numbers in bf16 (all exact in bf16); the loss is computed and returned in fp32.
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16).reshape(1, 1, 2, 2)
    target = torch.tensor([0.0, 0.0, 3.0, 6.0], dtype=torch.bfloat16).reshape(1, 1, 2, 2)
    loss, _ = diffusion_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(2.25, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# GAN losses: hinge (Alg. 1 line 25) and logistic / softplus (Eq. 10, DMD2 §3)
# ---------------------------------------------------------------------------------------------
#
# Logits [B=2, N=2]:
#   real = [[2, 0.5], [1.5, -1]]  relu(1 - l) = [0, 0.5, 0, 2]   -> mean 0.625
#   fake = [[-2, 0], [0.5, -3]]   relu(1 + l) = [0, 1, 1.5, 0]   -> mean 0.625
#   L_D = 1.25
#   dL_D/dreal = -1/4 where 1 - l > 0 else 0   -> [0, -0.25, 0, -0.25]  (l = 2, 1.5 > 1: no gradient)
#   dL_D/dfake = +1/4 where 1 + l > 0 else 0   -> [0, 0.25, 0.25, 0]    (l = -2, -3 < -1: no gradient)
#   L_G = -mean(fake) = -(-2 + 0 + 0.5 - 3) / 4 = 1.125, dL_G/dfake = -1/4 everywhere

REAL_LOGITS = [[2.0, 0.5], [1.5, -1.0]]
FAKE_LOGITS = [[-2.0, 0.0], [0.5, -3.0]]


def test_hinge_discriminator_by_hand() -> None:
    real = torch.tensor(REAL_LOGITS, requires_grad=True)
    fake = torch.tensor(FAKE_LOGITS, requires_grad=True)
    loss, logs = gan_d_hinge(real, fake)
    assert loss.item() == pytest.approx(1.25, abs=1e-6)
    assert logs["loss/disc"] == pytest.approx(1.25, abs=1e-6)
    assert logs["disc/real_logit"] == pytest.approx(0.75, abs=1e-6)  # (2 + 0.5 + 1.5 - 1) / 4
    assert logs["disc/fake_logit"] == pytest.approx(-1.125, abs=1e-6)  # (-2 + 0 + 0.5 - 3) / 4
    loss.backward()
    _close(real.grad, [[0.0, -0.25], [0.0, -0.25]])
    _close(fake.grad, [[0.0, 0.25], [0.25, 0.0]])


def test_hinge_discriminator_saturated_region_has_no_gradient() -> None:
    # D(real) > 1 and D(fake) < -1 everywhere: both hinges are 0 -> loss 0 and zero gradient.
    real = torch.tensor([[1.5, 3.0]], requires_grad=True)
    fake = torch.tensor([[-1.5, -4.0]], requires_grad=True)
    loss, _ = gan_d_hinge(real, fake)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(real.grad) == 0 and torch.count_nonzero(fake.grad) == 0


def test_hinge_generator_by_hand() -> None:
    fake = torch.tensor(FAKE_LOGITS, requires_grad=True)
    loss, logs = gan_g_hinge(fake)
    assert loss.item() == pytest.approx(1.125, abs=1e-6)
    assert logs["loss/gen_adv"] == pytest.approx(1.125, abs=1e-6)
    loss.backward()
    _close(fake.grad, [[-0.25, -0.25], [-0.25, -0.25]])


def test_logistic_at_logit_zero_is_log2_per_term() -> None:
    # sigmoid(0) = 1/2: -log(1/2) = log 2 for the real term and -log(1 - 1/2) = log 2 for the fake term.
    zeros = torch.zeros(2, 3)
    d_loss, _ = gan_d_logistic(zeros, zeros)
    g_loss, _ = gan_g_logistic(zeros)
    assert d_loss.item() == pytest.approx(2 * math.log(2), abs=1e-6)
    assert g_loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_logistic_discriminator_and_generator_by_hand() -> None:
    # l = ln 3 -> sigmoid(l) = 3/4.
    #   real term  -log D(real)      = -log(3/4) = log(4/3);  d/dl = -(1 - 3/4) = -1/4
    #   fake term  -log(1 - D(fake)) = -log(1/4) = log 4;     d/dl = 3/4
    #   L_D = log(4/3) + log 4 = log(16/3)
    #   L_G = -log D(fake) = log(4/3);                        d/dl = -1/4
    # With one logit per tensor ([B=1, N=1]) the means are the values themselves.
    ln3 = math.log(3.0)
    real = torch.tensor([[ln3]], requires_grad=True)
    fake = torch.tensor([[ln3]], requires_grad=True)
    d_loss, logs = gan_d_logistic(real, fake)
    assert d_loss.item() == pytest.approx(math.log(16 / 3), abs=1e-6)
    assert logs["loss/disc"] == pytest.approx(math.log(16 / 3), abs=1e-6)
    d_loss.backward()
    assert real.grad.item() == pytest.approx(-0.25, abs=1e-6)
    assert fake.grad.item() == pytest.approx(0.75, abs=1e-6)

    fake_g = torch.tensor([[ln3]], requires_grad=True)
    g_loss, glogs = gan_g_logistic(fake_g)
    assert g_loss.item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    assert glogs["loss/gen_adv"] == pytest.approx(math.log(4 / 3), abs=1e-6)
    g_loss.backward()
    assert fake_g.grad.item() == pytest.approx(-0.25, abs=1e-6)


def test_logistic_is_stable_for_large_logits() -> None:
    # softplus form: -log sigmoid(-100) = softplus(100) ~= 100 (a naive log(sigmoid) in fp32 gives inf).
    # real logit -100 -> 100; fake logit -100 -> softplus(-100) ~= 0. L_D ~= 100.
    d_loss, _ = gan_d_logistic(torch.tensor([[-100.0]]), torch.tensor([[-100.0]]))
    g_loss, _ = gan_g_logistic(torch.tensor([[-100.0]]))
    assert d_loss.item() == pytest.approx(100.0, abs=1e-4)
    assert g_loss.item() == pytest.approx(100.0, abs=1e-4)


def test_gan_loss_table() -> None:
    assert GAN_LOSSES["hinge"] == (gan_d_hinge, gan_g_hinge)
    assert GAN_LOSSES["logistic"] == (gan_d_logistic, gan_g_logistic)


# ---------------------------------------------------------------------------------------------
# EMA injection, Eq. (11), and matching_parameters
# ---------------------------------------------------------------------------------------------

def test_ema_inject_by_hand() -> None:
    # lambda = 0.98:  psi <- 0.98 psi + 0.02 theta
    #   0.98 * 1  + 0.02 * 51  = 0.98 + 1.02  = 2
    #   0.98 * 2  + 0.02 * -48 = 1.96 - 0.96  = 1
    #   0.98 * -3 + 0.02 * 2   = -2.94 + 0.04 = -2.9
    #   0.98 * 10 + 0.02 * 10  = 10;  0.98 * 0 + 0.02 * 100 = 2
    psi_a = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    theta_a = torch.tensor([51.0, -48.0, 2.0], dtype=torch.float64)
    psi_b = torch.tensor([[10.0, 0.0]], dtype=torch.float64)
    theta_b = torch.tensor([[10.0, 100.0]], dtype=torch.float64)
    theta_copies = (theta_a.clone(), theta_b.clone())
    ptr_a = psi_a.data_ptr()
    n = ema_inject_([(psi_a, theta_a), (psi_b, theta_b)], 0.98)
    assert n == 2
    _close(psi_a, [2.0, 1.0, -2.9], atol=1e-12)
    _close(psi_b, [[10.0, 2.0]], atol=1e-12)
    assert psi_a.data_ptr() == ptr_a  # in place
    assert torch.equal(theta_a, theta_copies[0]) and torch.equal(theta_b, theta_copies[1])


def test_ema_inject_lambda_edges() -> None:
    # lambda = 1 keeps psi; lambda = 0 copies theta.
    psi = torch.tensor([1.0, -2.0])
    ema_inject_([(psi, torch.tensor([5.0, 7.0]))], 1.0)
    assert psi.tolist() == [1.0, -2.0]
    ema_inject_([(psi, torch.tensor([5.0, 7.0]))], 0.0)
    assert psi.tolist() == [5.0, 7.0]


class _Psi(nn.Module):
    """dst: `lin` matches src; `extra` is absent in src; `shaped` differs in shape; `x` differs in name."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.shaped = nn.Linear(2, 2)
        self.extra = nn.Parameter(torch.zeros(3))
        self.x = nn.Parameter(torch.zeros(2))


class _Theta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)
        self.shaped = nn.Linear(2, 4)
        self.y = nn.Parameter(torch.zeros(2))


def test_matching_parameters_pairs_by_name_and_shape() -> None:
    psi, theta = _Psi(), _Theta()
    pairs = matching_parameters(psi, theta)
    # lin.weight [3, 2] and lin.bias [3] match; shaped.* differ in shape; extra/x/y have no same-named partner.
    assert len(pairs) == 2
    assert pairs[0][0] is psi.lin.weight and pairs[0][1] is theta.lin.weight
    assert pairs[1][0] is psi.lin.bias and pairs[1][1] is theta.lin.bias


def test_ema_inject_on_modules_moves_only_matched_psi() -> None:
    psi, theta = _Psi(), _Theta()
    with torch.no_grad():
        for p in psi.parameters():
            p.fill_(1.0)
        for p in theta.parameters():
            p.fill_(51.0)
    n = ema_inject_(matching_parameters(psi, theta), 0.98)
    assert n == 2
    # matched: 0.98 * 1 + 0.02 * 51 = 2; everything else in psi stays 1; theta stays 51.
    assert torch.allclose(psi.lin.weight, torch.full((3, 2), 2.0), atol=1e-6, rtol=0)
    assert torch.allclose(psi.lin.bias, torch.full((3,), 2.0), atol=1e-6, rtol=0)
    for p in (psi.shaped.weight, psi.shaped.bias, psi.extra, psi.x):
        assert torch.all(p == 1.0)
    for p in theta.parameters():
        assert torch.all(p == 51.0)
    assert psi.lin.weight.requires_grad  # still a trainable parameter after the in-place update
