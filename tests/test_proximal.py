"""Proximal Langevin (MYULA): prox operators (exact), the step (exact, fixed noise), stationary
moments against the Moreau–Yosida target π^λ (statistical, with negative controls), input
validation, and use inside SingleLoop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z, assert_close64, assert_single_loop_matches_hand_loop, f64, mean_within, randn64

from implicit_diffusion.models import GaussianPotential
from implicit_diffusion.objectives import RewardEstimator
from implicit_diffusion.samplers.langevin import ula_step
from implicit_diffusion.samplers.proximal import myula, myula_box, myula_l1, prox_box, prox_l1


class Flat:
    """f = 0: the target is exp(−g) alone."""

    def __call__(self, x):
        return x.new_zeros(x.shape[0])

    def grad_x(self, x):
        return torch.zeros_like(x)


def run_chains(step, x, gamma, n_steps, generator):
    with torch.no_grad():
        for _ in range(n_steps):
            x, _ = step(x, Flat(), step_size=gamma, generator=generator)
    return x


# ---------------------------------------------------------------------------------------------
# Exact
# ---------------------------------------------------------------------------------------------


def test_prox_l1_values_and_kink():
    x = f64([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0 + 1e-9, 3.0])
    # threshold t·weight = 0.5·2 = 1: |x| ≤ 1 (the kink included) maps to 0
    assert_close64(prox_l1(x, 0.5, 2.0), f64([-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1e-9, 2.0]))
    assert_close64(prox_l1(x, 0.5, 0.0), x)  # weight 0: identity


def test_prox_l1_minimises_the_prox_objective():
    """prox_{tg}(x) = argmin_u ½(u − x)² + t·w|u|: compare with a grid search (spacing 1e-4)."""
    u = torch.linspace(-4.0, 4.0, 80001, dtype=torch.float64)
    t, w = 0.35, 2.0
    for x in [-3.1, -0.71, -0.69, -0.2, 0.0, 0.4, 0.7, 1.3, 2.9]:
        best = u[torch.argmin(0.5 * (u - x) ** 2 + t * w * u.abs())]
        assert abs(float(prox_l1(f64([x]), t, w)[0]) - float(best)) <= 1e-4


def test_prox_box_values():
    x = f64([[-1.0, 0.0], [0.3, 1.0], [2.0, -0.5]])
    assert_close64(prox_box(x, 0.0, 1.0), f64([[0.0, 0.0], [0.3, 1.0], [1.0, 0.0]]))
    assert_close64(prox_box(x, f64([0.0, -1.0]), f64([0.5, 0.5])), f64([[0.0, 0.0], [0.3, 0.5], [0.5, -0.5]]))


def test_step_matches_formula_and_lands_on_prox():
    V = GaussianPotential(f64([0.5, -1.0]))
    x, z = f64([[2.0, 0.2], [-0.3, 4.0]]), f64([[0.3, -1.1], [0.7, 0.2]])
    x_copy, gamma, lam, w = x.clone(), 0.05, 0.2, 1.5
    x1, info = myula_l1(w, lam)(x, V, step_size=gamma, noise=z)
    soft = torch.sign(x) * (x.abs() - lam * w).clamp(min=0)
    expected = x - gamma * (x - V.mean.detach()) - gamma / lam * (x - soft) + math.sqrt(2 * gamma) * z
    assert_close64(x1, expected)
    assert_close64(x, x_copy)  # input not mutated
    assert info.acceptance_rate is None
    # f = 0 and γ = λ: the drift step is exactly the projection onto the box
    x0, zero = f64([[-0.5, 1.7], [0.4, 0.6]]), torch.zeros(2, 2, dtype=torch.float64)
    y, _ = myula_box(0.0, 1.0, 0.1)(x0, Flat(), step_size=0.1, noise=zero)
    assert_close64(y, f64([[0.0, 1.0], [0.4, 0.6]]))


# ---------------------------------------------------------------------------------------------
# Statistical
# ---------------------------------------------------------------------------------------------

LAM_BOX, GAMMA_BOX, STEPS_BOX = 1e-3, 3e-4, 2000  # T = 0.6


def box_moments_check(x):
    """Uniform on [0, 1] through the box indicator; π^λ has density ∝ 1 on [0, 1]
    and exp(−u²/(2λ)) at distance u outside, so with s = √(πλ/2) (closed form):
        out-of-box mass p_out = 2s/(1 + 2s) = 0.0734,
        Var^λ = (1/12 + 2(s/4 + λ + λs))/(1 + 2s) = 0.0975  (vs 1/12 = 0.0833: the λ-bias, O(√λ)).
    n = 8000 chains (final states, i.i.d.). SE parts: mean Z·σ/√n = 0.017; variance
    Z·Var^λ·√(2/(n−1)) = 0.0077 (Gaussian formula, conservative: kurtosis of π^λ < 3); p_out
    Z·√(p(1−p)/n) = 0.015. γ-bias: the exact stationary law of this discretised chain (1-D
    transition kernel on a 3000-point grid, leading eigenvector) has Var 0.09660 and p_out
    0.06929, i.e. biases 9e-4 and 4.2e-3; budget 2e-3 and 8e-3. Burn-in from x₀ = 0.25: the
    slowest mode decays as exp(−π²T) = 3e-3, a mean offset ≤ 0.25·3e-3 ≪ 0.017."""
    n = x.numel()
    s = math.sqrt(math.pi * LAM_BOX / 2)
    var_lam = (1 / 12 + 2 * (s / 4 + LAM_BOX + LAM_BOX * s)) / (1 + 2 * s)
    p_out = 2 * s / (1 + 2 * s)
    out = float(((x < 0) | (x > 1)).double().mean())
    return (
        mean_within(x, 0.5, math.sqrt(var_lam))
        and abs(float(x.var()) - var_lam) <= Z * var_lam * math.sqrt(2 / (n - 1)) + 2e-3
        and abs(out - p_out) <= Z * math.sqrt(p_out * (1 - p_out) / n) + 8e-3
    )


def test_box_uniform_moments(generator):
    x0 = torch.full((8000, 1), 0.25, dtype=torch.float64)
    x = run_chains(myula_box(0.0, 1.0, LAM_BOX), x0, GAMMA_BOX, STEPS_BOX, generator)
    assert box_moments_check(x), (float(x.mean()), float(x.var()), float(((x < 0) | (x > 1)).double().mean()))
    assert float(x.min()) > -0.2 and float(x.max()) < 1.2  # leaves the box by O(√λ) only


def test_box_negative_control_plain_ula(generator):
    """f = 0 without the envelope is a random walk: Var = 2γk, already 0.18 ≫ Var^λ after k = 300
    of the 2000 steps (and growing)."""
    x = run_chains(ula_step, torch.full((8000, 1), 0.25, dtype=torch.float64), GAMMA_BOX, 300, generator)
    assert not box_moments_check(x)
    assert float(x.var()) > 0.15


LAM_LAP, GAMMA_LAP, STEPS_LAP = 0.05, 0.02, 1500  # T = 30


def laplace_check(x):
    """π ∝ exp(−|x|) (E|x| = 1, Var = 2) through g = |x|: π^λ ∝ exp(−Huber_λ(x)), its moments
    by trapezoidal quadrature on [−60, 60] (h = 5e-4): E|x| = 1.0004, Var = 2.0008. n = 8000
    chains (final states). SE parts: mean Z·√(Var/n) = 0.079; E|x| Z·sd(|x|)/√n = 0.056; variance
    Z·√((μ₄ − σ⁴)/n) = 0.25 (Laplace kurtosis 6, so not the Gaussian formula). γ-bias: the exact
    stationary law of the discretised chain (grid kernel, 2000 points on [−25, 25]) has
    E|x| 1.0101, Var 2.0216, i.e. biases 1e-2 and 2.1e-2; budget 2e-2 and 4e-2. Burn-in from
    x₀ = 3: spectral gap 1/4, 3·e^{−T/4} = 2e-3."""
    u = torch.linspace(-60.0, 60.0, 240001, dtype=torch.float64)
    p = torch.exp(-torch.where(u.abs() <= LAM_LAP, u**2 / (2 * LAM_LAP), u.abs() - LAM_LAP / 2))
    p = p / torch.trapezoid(p, u)
    m1, m2, m4 = (float(torch.trapezoid(p * v, u)) for v in (u.abs(), u**2, u**4))
    n = x.numel()
    return (
        bool(torch.isfinite(x).all())
        and mean_within(x, 0.0, math.sqrt(m2))
        and abs(float(x.abs().mean()) - m1) <= Z * math.sqrt((m2 - m1**2) / n) + 2e-2
        and abs(float(x.var()) - m2) <= Z * math.sqrt((m4 - m2**2) / n) + 4e-2
    )


def test_laplace_moments(generator):
    x0 = torch.full((8000, 1), 3.0, dtype=torch.float64)
    x = run_chains(myula_l1(1.0, LAM_LAP), x0, GAMMA_LAP, STEPS_LAP, generator)
    assert laplace_check(x), (float(x.mean()), float(x.abs().mean()), float(x.var()))


def test_laplace_negative_control_sign_flip(generator):
    """x + (γ/λ)(x − prox) (prox replaced by 2x − prox): pushed outwards at unit speed, so
    E|x| ≈ 3 + γk = 9 after k = 300 of the 1500 steps."""
    flipped = myula(lambda x, t: 2 * x - prox_l1(x, t, 1.0), LAM_LAP)
    x = run_chains(flipped, torch.full((8000, 1), 3.0, dtype=torch.float64), GAMMA_LAP, 300, generator)
    assert not laplace_check(x)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors():
    for lam in (0.0, -1.0):
        with pytest.raises(ValueError, match="lam"):
            myula_l1(1.0, lam)
    with pytest.raises(ValueError, match="lower < upper"):
        myula_box(1.0, 0.0, 0.1)
    with pytest.raises(ValueError, match="lower < upper"):
        myula_box(f64([0.0, 1.0]), f64([1.0, 1.0]), 0.1)
    with pytest.raises(ValueError, match="lower < upper"):
        prox_box(f64([0.5]), 0.0, 0.0)
    with pytest.raises(ValueError, match="weight"):
        myula_l1(-1.0, 0.1)
    with pytest.raises(ValueError, match="weight"):
        prox_l1(f64([0.5]), 0.1, -0.5)
    step, x = myula_l1(1.0, 0.1), f64([[0.5, 0.5]])
    with pytest.raises(ValueError, match="step_size"):
        step(x, Flat(), step_size=0.0, noise=torch.zeros_like(x))
    with pytest.raises(ValueError, match="needs randomness"):
        step(x, Flat(), step_size=0.01)


# ---------------------------------------------------------------------------------------------
# Inside an algorithm
# ---------------------------------------------------------------------------------------------


def test_runs_inside_single_loop(generator):
    """SingleLoop(sampler=myula_l1(...)): particles equal a hand-written loop with the same θ
    updates, θ moves, and no autograd history is carried."""
    est = RewardEstimator(lambda x: -((x - f64([2.0, -1.0])) ** 2).sum(-1))
    assert_single_loop_matches_hand_loop(GaussianPotential(torch.zeros(2, dtype=torch.float64)), est,
                                         myula_l1(0.5, 0.2), randn64(generator, 300, 2), step_size=0.1,
                                         min_change=0.01)
