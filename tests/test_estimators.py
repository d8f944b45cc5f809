"""Estimators Γ as surrogate losses: autograd of the surrogate vs the closed-form backward
(exact), unbiasedness on the Gaussian closed forms of paper-notes §6 (statistical, with negative
controls), the sign of the KL term end to end, and error messages."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z, assert_close64, f64, randn64

from implicit_diffusion.algorithms import SingleLoop
from implicit_diffusion.models import EnergyMLP, GaussianMixture, GaussianPotential, hexagon_mixture
from implicit_diffusion.objectives import (
    ContrastiveKL,
    Estimator,
    KLToReference,
    RewardEstimator,
    SumEstimator,
    Surrogate,
    hexagon_reward,
    hexagon_reward_smooth,
)


def first_coord_squared(x):
    return x[:, 0] ** 2


def grads_of(potential) -> list[torch.Tensor]:
    return [p.grad.clone() for p in potential.parameters()]


def zero_grads(potential) -> None:
    for p in potential.parameters():
        p.grad = None


def gamma_by_autograd(surrogate: Surrogate, potential) -> list[torch.Tensor]:
    zero_grads(potential)
    surrogate.loss(potential).backward()
    return grads_of(potential)


def gamma_by_closed_form(surrogate: Surrogate, potential) -> list[torch.Tensor]:
    zero_grads(potential)
    surrogate.backward(potential)
    return grads_of(potential)


# ---------------------------------------------------------------------------------------------
# Exact: loss().backward() == backward(), and the weights by hand
# ---------------------------------------------------------------------------------------------


def make_potential(name: str):
    if name == "gaussian":
        return GaussianPotential(f64([0.4, -0.3]), 0.8)
    if name == "mixture":
        return hexagon_mixture(dtype=torch.float64)
    if name == "mixture-diff-var":
        return GaussianMixture(f64([[0.0, 0.0], [2.0, 1.0], [-1.0, 1.5]]), f64([0.5, 2.0, 1.0]), f64([0.2, -0.3, 0.1]))
    if name == "energy-mlp":
        V = EnergyMLP(2, hidden=8).double()
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in V.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        return V
    raise KeyError(name)


def perturb(potential, generator) -> None:
    """Move θ away from θ₀ so that the KL term is not identically zero."""
    with torch.no_grad():
        for p in potential.parameters():
            p.add_(0.7 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def make_estimator(kind: str, potential, generator) -> Estimator:
    reward = RewardEstimator(lambda x: torch.sin(x[:, 0]) + x[:, 1] ** 2, weight=1.7)
    kl = KLToReference(potential, weight=0.6)
    contrastive = ContrastiveKL(randn64(generator, 13, 2) + 1.0, weight=1.3)
    return {
        "reward": reward,
        "kl": kl,
        "contrastive": contrastive,
        "reward+kl": reward + kl,
        "reward+kl+contrastive": reward + kl + contrastive,
    }[kind]


@pytest.mark.parametrize("name", ["gaussian", "mixture", "mixture-diff-var", "energy-mlp"])
@pytest.mark.parametrize("kind", ["reward", "kl", "contrastive", "reward+kl", "reward+kl+contrastive"])
def test_surrogate_autograd_equals_closed_form(kind, name, generator):
    V = make_potential(name)
    est = make_estimator(kind, V, generator)
    perturb(V, generator)
    x = 2 * randn64(generator, 31, 2)
    with torch.no_grad():
        s = est(V, x)
    auto = gamma_by_autograd(s, V)
    closed = gamma_by_closed_form(s, V)
    assert len(auto) == len(closed) == len(list(V.parameters()))
    for a, c in zip(auto, closed):
        assert_close64(c, a)
    assert any(float(a.abs().max()) > 1e-3 for a in auto)  # a non-trivial Γ


class _PlainEnergy(torch.nn.Module):
    """A plain nn.Module energy (no Potential, no accumulate_param_grad)."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Parameter(f64([0.3, -0.1]))
        self.log_scale = torch.nn.Parameter(f64(0.2))

    def forward(self, x):
        return ((x - self.loc) ** 2).sum(-1) * torch.exp(self.log_scale) / 2 + torch.sin(x).sum(-1)


@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_surrogate_backward_on_plain_module(grad_mode, generator):
    """Surrogate.backward on a module without accumulate_param_grad: the autograd gradient of the loss,
    also when called under torch.no_grad (as the algorithms do)."""
    V = _PlainEnergy()
    x = randn64(generator, 21, 2)
    est = RewardEstimator(first_coord_squared) + ContrastiveKL(randn64(generator, 7, 2))
    with torch.no_grad():
        s = est(V, x)
    expected = gamma_by_autograd(s, V)
    zero_grads(V)
    with torch.set_grad_enabled(grad_mode):
        s.backward(V)
    for p, e in zip(V.parameters(), expected):
        assert_close64(p.grad, e)
    assert all(float(e.abs().max()) > 1e-3 for e in expected)


def test_reward_weights_by_hand(generator):
    """wᵢ = λ(R(xᵢ) − R̄)/(N−1), stats["reward"] = R̄, and Γ = λ/(N−1) Σ (Rᵢ − R̄)(μ − xᵢ)/σ² (Gaussian)."""
    V = GaussianPotential(f64([0.4, -0.3]), 0.8)
    x = randn64(generator, 25, 2)
    lam = 2.5
    s = RewardEstimator(first_coord_squared, weight=lam)(V, x)
    r = x[:, 0] ** 2
    assert len(s.points) == 1 and s.points[0] is x
    assert_close64(s.weights[0], lam * (r - r.mean()) / 24)
    assert_close64(s.stats["reward"], r.mean())
    expected = lam / 24 * ((r - r.mean())[:, None] * (V.mean.detach() - x)).sum(0) / 0.8
    assert_close64(gamma_by_closed_form(s, V)[0], expected)


def test_kl_weights_by_hand_and_frozen_reference(generator):
    """wᵢ = β(hᵢ − h̄)/(N−1) with hᵢ = V(xᵢ, θ) − V(xᵢ, θ₀); θ₀ frozen at construction."""
    V = GaussianPotential(f64([0.0, 0.0]))
    V0 = GaussianPotential(f64([0.0, 0.0]))
    kl = KLToReference(V, weight=0.5)
    with torch.no_grad():
        V.mean.copy_(f64([1.0, -2.0]))
    x = randn64(generator, 20, 2)
    assert_close64(kl.reference_energy(V, x), V0(x).detach())
    s = kl(V, x)
    h = (V(x) - V0(x)).detach()
    assert_close64(s.weights[0], 0.5 * (h - h.mean()) / 19)
    assert_close64(s.stats["energy_gap"], h.mean())
    assert torch.equal(V.mean.detach(), f64([1.0, -2.0]))  # functional_call restored θ


def test_contrastive_weights_by_hand(generator):
    ref = randn64(generator, 8, 2)
    x = randn64(generator, 5, 2)
    s = ContrastiveKL(ref, weight=3.0)(GaussianPotential(f64([0.0, 0.0])), x)
    assert torch.equal(s.points[0], ref) and s.points[1] is x
    assert_close64(s.weights[0], torch.full((8,), 3.0 / 8, dtype=torch.float64))
    assert_close64(s.weights[1], torch.full((5,), -3.0 / 5, dtype=torch.float64))


def test_sum_estimator_flattens_and_merges_stats(generator):
    V = GaussianPotential(f64([0.0, 0.0]))
    a, b = RewardEstimator(first_coord_squared), KLToReference(V)
    c = ContrastiveKL(randn64(generator, 4, 2))
    total = a + b + c
    assert isinstance(total, SumEstimator) and total.estimators == (a, b, c)
    s = total(V, randn64(generator, 6, 2))
    assert len(s.points) == len(s.weights) == 4
    assert set(s.stats) == {"reward", "energy_gap"}
    with pytest.raises(TypeError):
        a + 1.0  # noqa: B018


# ---------------------------------------------------------------------------------------------
# Statistical: unbiasedness on the Gaussian closed forms (paper-notes §6)
# ---------------------------------------------------------------------------------------------


def mean_and_se(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over i.i.d. batch estimates (dim 0) and its standard error sd/√B."""
    return samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])


def within(samples: torch.Tensor, target: torch.Tensor, z: float = Z) -> bool:
    m, se = mean_and_se(samples)
    return bool(((m - target).abs() <= z * se).all())


def batch_gammas(estimator, V, sampler, num_batches: int, flip: bool = False) -> torch.Tensor:
    """Γ of `num_batches` independent batches (closed-form backward), shape (B, dim)."""
    out = []
    for _ in range(num_batches):
        x = sampler()
        with torch.no_grad():
            s = estimator(V, x)
        g = gamma_by_closed_form(s, V)[0]
        out.append(-g if flip else g)
    return torch.stack(out)


THETA = f64([0.8, -0.5, 1.2])


@pytest.mark.parametrize("flip", [False, True], ids=["estimator", "negative-control-flipped-sign"])
def test_reward_estimator_unbiased_gaussian(flip, generator):
    """V = ‖x − θ‖²/2, π*(θ) = N(θ, I), R = x₁²: ∇θE[R] = (2θ₁, 0, 0) so E[Γ_R] = −(2θ₁, 0, 0).

    B = 400 batches of N = 1,000 exact draws; tolerance 5 standard errors of the batch mean, the SE
    estimated from the B i.i.d. batch values (≈ √((θ₁⁴ + 14θ₁² + 15)/(NB)) ≈ 0.008 for the first
    coordinate); the 1/(N−1) covariance is unbiased. Negative control: Γ with a flipped sign is off by
    4θ₁ = 3.2 ≈ 400 SE."""
    V = GaussianPotential(THETA, 1.0)
    est = RewardEstimator(first_coord_squared)
    gammas = batch_gammas(est, V, lambda: THETA + randn64(generator, 1000, 3), 400, flip)
    target = -f64([2 * float(THETA[0]), 0.0, 0.0])
    assert within(gammas, target) == (not flip)


def test_reward_estimator_unbiased_for_tiny_batches(generator):
    """Γ_R uses the unbiased 1/(N−1) sample covariance (reward.py docstring), so E[Γ_R] = −∇θE[R]
    even for N = 4. B = 8,000 batches: the SE of the mean of the first coordinate is ≈ 0.02. Negative
    control: the plug-in 1/N covariance, E = −(N−1)/N·∇θE[R], is off by (1/N)·2θ₁ = 0.4 ≈ 20 SE and
    must fail the same check. (Γ from the weights: Σ wᵢ(θ − xᵢ), the closed form ∇θV = θ − x
    checked exactly above.)"""
    N, B = 4, 8000
    x = THETA + randn64(generator, B, N, 3)
    V = GaussianPotential(THETA, 1.0)
    est = RewardEstimator(first_coord_squared)
    gammas = []
    for b in range(B):
        with torch.no_grad():
            w = est(V, x[b]).weights[0]
        gammas.append(w @ (THETA - x[b]))
    gammas = torch.stack(gammas)
    grad = f64([2 * float(THETA[0]), 0.0, 0.0])
    assert within(gammas, -grad)
    assert not within(gammas * (N - 1) / N, -grad)


@pytest.mark.parametrize("flip", [False, True], ids=["estimator", "negative-control-flipped-sign"])
def test_kl_estimator_unbiased_gaussian(flip, generator):
    """KL(N(θ, I) ‖ N(θ₀, I)) = ‖θ − θ₀‖²/2 ⇒ E[Γ_KL] = θ − θ₀ (β = 1).

    B = 400 batches of N = 1,000 exact draws from N(θ, I); per-sample variance of coordinate j is
    ‖Δ‖² + Δⱼ² (Δ = θ − θ₀), SE ≈ 0.005; tolerance 5 SE estimated from the batches (the
    1/(N−1) covariance is unbiased). Negative control: a flipped sign is off by 2|Δⱼ| ≥ 1 ≈ 200 SE."""
    theta0 = f64([0.0, 1.0, -0.5])
    V = GaussianPotential(theta0, 1.0)
    kl = KLToReference(V)
    with torch.no_grad():
        V.mean.copy_(THETA)
    gammas = batch_gammas(kl, V, lambda: THETA + randn64(generator, 1000, 3), 400, flip)
    assert within(gammas, THETA - theta0) == (not flip)


@pytest.mark.parametrize("flip", [False, True], ids=["estimator", "negative-control-flipped-sign"])
def test_contrastive_estimator_unbiased_gaussian(flip, generator):
    """Γ_ref = E_ref[∇θV] − E_p[∇θV] = x̄ − x̄_ref with p = N(θ, I), p_ref = N(m, I): mean θ − m.

    B = 400 batches, N = 500 model draws and N_ref = 300 reference draws each (a fresh reference
    set per batch); SE per coordinate √((1/N + 1/N_ref)/B) ≈ 0.0036, tolerance 5 SE from the batches.
    Negative control: a flipped sign is off by 2|θ − m| ≥ 0.6 ≈ 160 SE."""
    m = f64([1.1, 0.5, 0.0])
    V = GaussianPotential(THETA, 1.0)
    gammas = []
    for _ in range(400):
        est = ContrastiveKL(m + randn64(generator, 300, 3))
        gammas.append(batch_gammas(est, V, lambda: THETA + randn64(generator, 500, 3), 1, flip)[0])
    assert within(torch.stack(gammas), THETA - m) == (not flip)


# ---------------------------------------------------------------------------------------------
# The KL sign, end to end
# ---------------------------------------------------------------------------------------------


def reward_toward_3(x):
    return -((x[:, 0] - 3.0) ** 2)


def run_single_loop(beta: float | None, generator, steps: int = 1500, n: int = 4000) -> float:
    """SingleLoop on V = (x − θ)²/2 from θ = θ₀ = 0 with R = −(x − 3)² (+ β·KL to θ₀); returns θ
    averaged over the last 500 iterations."""
    V = GaussianPotential(f64([0.0]), 1.0)
    est = RewardEstimator(reward_toward_3)
    if beta is not None:
        est = est + KLToReference(V, weight=beta)
    algo = SingleLoop(V, est, torch.optim.SGD(V.parameters(), lr=0.05), step_size=0.1)
    trace = []
    algo.run(randn64(generator, n, 1), steps, generator=generator,
             callbacks=[lambda k, x, s: trace.append(float(V.mean.detach()))])
    return sum(trace[-500:]) / 500


def test_kl_term_pulls_back_toward_reference(generator):
    """π = N(θ, 1), R = −(x − 3)²: E[R] = −((θ − 3)² + 1), KL(π_θ ‖ π_θ₀) = θ²/2 (θ₀ = 0), so
    −E[R] + β·KL is minimised at θ* = 6/(2 + β): 3 (β = 0), 2 (β = 1), 6 (β = −1, the wrong sign).
    Under ULA the particles' variance v ≠ 1 but both Γ_R = 2v(m − 3) and Γ_KL = βvθ scale with v,
    so the fixed point is the same.

    Tolerance 0.15 on θ̄, θ averaged over the last 500 of 1,500 iterations (N = 4,000, γ = 0.1,
    η = 0.05), bias-free at the fixed point; its noise, linearised: the per-step Γ has sd
    s ≤ √(222/N) ≈ 0.24 (at θ = 6), the θ–particle system contracts at ρ ≤ 0.98 per step, so
    sd(θ) ≈ ηs/√(1 − ρ²) ≈ 0.06 and sd(θ̄) ≈ sd(θ)·√((1 + ρ)/((1 − ρ)·500)) ≈ 0.027: 0.15 ≈ 5.5 sd.
    Over seeds 0–19 the measured sd of θ̄ − θ* was 0.004 / 0.002 / 0.008 (β = 0 / 1 / −1), the
    largest deviation 0.023. The three optima are ≥ 1 apart, so the ordering is decisive.
    """
    theta_r = run_single_loop(None, generator)
    theta_kl = run_single_loop(1.0, generator)
    theta_wrong = run_single_loop(-1.0, generator)
    assert theta_r == pytest.approx(3.0, abs=0.15)
    assert theta_kl == pytest.approx(6.0 / 3.0, abs=0.15)
    assert theta_wrong == pytest.approx(6.0 / 1.0, abs=0.15)
    assert abs(theta_kl) < abs(theta_r) < abs(theta_wrong)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_reward_estimator_shape_errors():
    V = GaussianPotential(torch.zeros(2))
    x = torch.zeros(5, 2)

    def column_reward(x):
        return x[:, :1]

    with pytest.raises(ValueError, match=r"reward_fn column_reward must return one value per particle, "
                       r"shape \(5,\); got shape \(5, 1\)"):
        RewardEstimator(column_reward)(V, x)
    with pytest.raises(ValueError, match=r"reward_fn <lambda> .*got shape \(\)"):
        RewardEstimator(lambda x: x.sum())(V, x)
    with pytest.raises(ValueError, match=r"got shape \(4,\)"):
        RewardEstimator(lambda x: x[:4, 0])(V, x)

    class Scorer:
        def __call__(self, x):
            return float(x.sum())

    with pytest.raises(TypeError, match=r"reward_fn Scorer must return a torch.Tensor of shape \(5,\), got float"):
        RewardEstimator(Scorer())(V, x)


def test_contrastive_reference_errors():
    with pytest.raises(ValueError, match="reference must have shape"):
        ContrastiveKL(torch.zeros(5))
    with pytest.raises(ValueError, match="n_ref > 0"):
        ContrastiveKL(torch.zeros(0, 2))


def test_hexagon_rewards_values():
    """R(x) = 1[x₁ ≥ 0]·exp(−((x₁ − 4)² + (x₂ − 3.8)²)/20)/2.5 and the smoothed version (exact)."""
    x = f64([[4.0, 3.8], [0.0, 0.0], [-1e-9, 3.8], [2.0, 2 * math.sqrt(3)], [-4.0, 0.0]])
    q = (x[:, 0] - 4) ** 2 + (x[:, 1] - 3.8) ** 2
    ind = (x[:, 0] >= 0).double()
    assert_close64(hexagon_reward(x), ind * torch.exp(-q / 20) / 2.5)
    assert float(hexagon_reward(x)[0]) == pytest.approx(0.4, rel=1e-12)
    assert float(hexagon_reward(x)[2]) == 0.0
    assert_close64(hexagon_reward_smooth(x), torch.sigmoid(x[:, 0] / 0.5) * torch.exp(-q / 20) / 0.7)
    x_copy = x.clone()
    hexagon_reward(x)
    hexagon_reward_smooth(x)
    assert torch.equal(x, x_copy)  # the in-place arithmetic works on copies
