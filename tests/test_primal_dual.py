"""Primal-dual Langevin (ULPDA) for π ∝ exp(−f(x) − g(Dx)): the difference operators and their
adjoints (exact), two steps against a hand computation (exact, float64), the dual state, the exact
stationary law of the linear-Gaussian chain for quadratic g (discrete Lyapunov equation;
statistical, negative controls: no over-relaxation, a sign flip on Dᵀy) and its γ → 0 limit,
TV moments against quadrature with a measured bias budget, errors, and use inside SingleLoop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z, assert_close64, assert_single_loop_matches_hand_loop, f64, mean_within, randn64, var_within

from implicit_diffusion.models import GaussianPotential
from implicit_diffusion.objectives import RewardEstimator
from implicit_diffusion.samplers import (
    LinearOperator,
    PrimalDualLangevin,
    dense_operator,
    finite_difference_1d,
    finite_difference_2d,
    primal_dual_langevin,
    quadratic_dual_prox,
)


def matrix_of(D: LinearOperator) -> torch.Tensor:
    """The dense (p, d) matrix of D, from D applied to the basis vectors."""
    return D.apply(torch.eye(D.in_dim, dtype=torch.float64)).T


def negated_adjoint(D: LinearOperator) -> LinearOperator:
    """D with Dᵀ replaced by −Dᵀ: the sign-flip negative control on the primal's Dᵀy term."""
    return D._replace(adjoint=lambda y: -D.adjoint(y))


class Quadratic:
    """f(x) = ½(x − μ)ᵀA(x − μ), with its exact gradient."""

    def __init__(self, A, mu):
        self.A, self.mu = A, mu

    def __call__(self, x):
        return 0.5 * (((x - self.mu) @ self.A) * (x - self.mu)).sum(-1)

    def grad_x(self, x):
        return (x - self.mu) @ self.A


def run(step, V, x, gamma, num_steps, generator):
    with torch.no_grad():
        for _ in range(num_steps):
            x, _ = step(x, V, step_size=gamma, generator=generator)
    return x


# ---------------------------------------------------------------------------------------------
# Exact
# ---------------------------------------------------------------------------------------------


def test_difference_operators():
    assert_close64(matrix_of(finite_difference_1d(3)), f64([[-1, 1, 0], [0, -1, 1]]))
    # 2×3 image, row-major pixels 0..5: horizontal (0,1) (1,2) (3,4) (4,5), vertical (0,3) (1,4) (2,5)
    K = torch.zeros(7, 6, dtype=torch.float64)
    for r, (i, j) in enumerate([(0, 1), (1, 2), (3, 4), (4, 5), (0, 3), (1, 4), (2, 5)]):
        K[r, i], K[r, j] = -1.0, 1.0
    assert_close64(matrix_of(finite_difference_2d(2, 3)), K)
    assert_close64(matrix_of(finite_difference_2d(1, 4)), matrix_of(finite_difference_1d(4)))
    g = torch.Generator().manual_seed(0)
    for D in (finite_difference_1d(5), finite_difference_2d(3, 4), finite_difference_2d(4, 1),
              dense_operator(randn64(g, 3, 5))):
        x, y = randn64(g, 6, D.in_dim), randn64(g, 6, D.out_dim)
        Kd = matrix_of(D)
        assert_close64(D.apply(x), x @ Kd.T)
        assert_close64(D.adjoint(y), y @ Kd)  # the adjoint is the transpose
        assert float(torch.linalg.matrix_norm(Kd, ord=2)) <= D.norm_bound + 1e-12


def test_two_steps_match_hand_computation():
    """x⁺ = x − γ(∇f(x) + Dᵀy) + √(2γ)z, y⁺ = clamp(y + σD(2x⁺ − x), −w, w), from y = 0, twice."""
    A, mu = f64([[2.0, 0.3, 0.0], [0.3, 1.0, 0.1], [0.0, 0.1, 1.5]]), f64([0.5, -1.0, 0.2])
    V, K = Quadratic(A, mu), matrix_of(finite_difference_1d(3))
    gamma, sigma, w = 0.1, 0.5, 1.0
    x = f64([[0.2, 1.5, -0.4], [2.0, -1.0, 0.5]])
    z1, z2 = f64([[0.3, -0.2, 1.0], [-0.5, 0.4, 0.1]]), f64([[1.2, 0.0, -0.7], [0.2, 0.9, -1.1]])
    step, x_copy = primal_dual_langevin(finite_difference_1d(3), tv_weight=w, dual_step=sigma), x.clone()
    y = torch.zeros(2, 2, dtype=torch.float64)
    xr = x
    for z in (z1, z2):
        x_new = xr - gamma * ((xr - mu) @ A + y @ K) + math.sqrt(2 * gamma) * z
        y = torch.clamp(y + sigma * (2 * x_new - xr) @ K.T, -w, w)
        xr = x_new
    x1, info = step(x, V, step_size=gamma, noise=z1)
    x2, _ = step(x1, V, step_size=gamma, noise=z2)
    assert_close64(x2, xr)
    assert_close64(step.dual, y)
    assert bool((y.abs() == w).any()) and bool((y.abs() < w).any())  # the clamp is active and inactive
    assert_close64(x, x_copy)  # input not mutated
    assert info.acceptance_rate is None


def test_dual_state_resets():
    step, V = primal_dual_langevin(finite_difference_1d(2), tv_weight=1.0), GaussianPotential(f64([0.0, 0.0]))
    x = f64([[0.0, 1.0], [1.0, 0.0]])
    assert step.dual is None
    step(x, V, step_size=0.1, noise=torch.zeros_like(x))
    y = step.dual.clone()
    step(x, V, step_size=0.1, noise=torch.zeros_like(x))
    assert not torch.equal(step.dual, y)  # carried and updated
    step.reset()
    assert step.dual is None
    step(x, V, step_size=0.1, noise=torch.zeros_like(x))
    assert_close64(step.dual, y)  # from y = 0 again
    step(x[:1], V, step_size=0.1, noise=torch.zeros_like(x[:1]))  # a new batch shape: y restarts at 0
    assert_close64(step.dual, y[:1])
    assert not step.dual.requires_grad


# ---------------------------------------------------------------------------------------------
# Statistical: quadratic g, the chain is linear-Gaussian
# ---------------------------------------------------------------------------------------------

A_Q, MU_Q, ALPHA = f64([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 2.0]]), f64([1.0, -0.5, 0.3]), 2.0
K_Q = matrix_of(finite_difference_1d(3))
TARGET_COV = torch.linalg.inv(A_Q + ALPHA * K_Q.T @ K_Q)  # π ∝ exp(−f(x) − (α/2)‖Dx‖²)
TARGET_MEAN = TARGET_COV @ A_Q @ MU_Q


def stationary_cov(gamma, sigma, theta=1.0):
    """x-block of the stationary covariance of the chain in (x, y) around its fixed point (the
    fixed point's x is TARGET_MEAN exactly, since y* = αDx*): e⁺ = (I − γA)e − γDᵀe_y + √(2γ)z,
    e_y⁺ = c(e_y + σD((1 + θ)e⁺ − θe)), c = α/(α + σ). S = M S Mᵀ + B Bᵀ, solved as
    (I − M⊗M) vec S = vec(BBᵀ) in float64."""
    d, p = 3, 2
    c, eye = ALPHA / (ALPHA + sigma), torch.eye(3, dtype=torch.float64)
    Mx = torch.cat([eye - gamma * A_Q, -gamma * K_Q.T], 1)
    Bx = math.sqrt(2 * gamma) * eye
    My = c * torch.cat([torch.zeros(p, d, dtype=torch.float64), torch.eye(p, dtype=torch.float64)], 1)
    My = My + c * sigma * K_Q @ ((1 + theta) * Mx - theta * torch.cat([eye, torch.zeros(d, p, dtype=torch.float64)], 1))
    By = c * sigma * (1 + theta) * K_Q @ Bx
    M, B = torch.cat([Mx, My]), torch.cat([Bx, By])
    assert float(torch.linalg.eigvals(M).abs().max()) < 1
    n = d + p
    S = torch.linalg.solve(torch.eye(n * n, dtype=torch.float64) - torch.kron(M, M), (B @ B.T).reshape(-1))
    return S.reshape(n, n)[:d, :d]


DIRECTIONS = torch.cat([torch.eye(3, dtype=torch.float64), K_Q, f64([[1.0, 1.0, 1.0]])])  # coordinates, differences
N = 20_000
GAMMA_Q, SIGMA_Q, STEPS_Q = 0.1, 1.0, 300  # spectral radius 0.892: 0.892^300 ≈ 1e-15


def gaussian_check(x, mean, cov):
    """For each direction v (coordinates, differences, sum): |mean(xv) − vᵀm| ≤ Z·√(vᵀCv/n) and
    |var(xv) − vᵀCv| ≤ Z·vᵀCv·√(2/(n−1)) (Gaussian final states of n independent chains)."""
    if not bool(torch.isfinite(x).all()):
        return False
    proj = x @ DIRECTIONS.T
    for j, v in enumerate(DIRECTIONS):
        var = float(v @ cov @ v)
        if not (mean_within(proj[:, j], float(v @ mean), math.sqrt(var)) and var_within(proj[:, j], var)):
            return False
    return True


def quadratic_chain(generator, **kwargs):
    D = kwargs.pop("D", finite_difference_1d(3))
    step = primal_dual_langevin(D, dual_prox=quadratic_dual_prox(ALPHA), dual_step=SIGMA_Q, **kwargs)
    return run(step, Quadratic(A_Q, MU_Q), randn64(generator, N, 3), GAMMA_Q, STEPS_Q, generator)


def test_quadratic_g_exact_stationary_law(generator):
    x = quadratic_chain(generator)
    assert gaussian_check(x, TARGET_MEAN, stationary_cov(GAMMA_Q, SIGMA_Q)), (x.mean(0), torch.cov(x.T))


def test_quadratic_negative_control_no_overrelaxation(generator):
    """y + σDx⁺ instead of y + σD(2x⁺ − x): a different stationary law (exact: the variances of
    x₂ − x₁ and x₃ − x₂ are 30% and 28% higher, against a 5% tolerance)."""
    S1, S0 = stationary_cov(GAMMA_Q, SIGMA_Q, 1.0), stationary_cov(GAMMA_Q, SIGMA_Q, 0.0)
    assert float(K_Q[0] @ S0 @ K_Q[0]) > 1.25 * float(K_Q[0] @ S1 @ K_Q[0])
    x = quadratic_chain(generator, overrelaxation=0.0)
    assert not gaussian_check(x, TARGET_MEAN, stationary_cov(GAMMA_Q, SIGMA_Q))
    assert gaussian_check(x, TARGET_MEAN, S0)  # ... and it is the law the Lyapunov equation predicts


def test_quadratic_negative_control_sign_flip(generator):
    x = quadratic_chain(generator, D=negated_adjoint(finite_difference_1d(3)))
    assert not gaussian_check(x, TARGET_MEAN, stationary_cov(GAMMA_Q, SIGMA_Q))


def test_quadratic_bias_vanishes_as_gamma_shrinks():
    """The exact stationary covariance tends to the target's (A + αDᵀD)⁻¹ as γ → 0 at fixed σ."""
    errors = [float((stationary_cov(g, SIGMA_Q) - TARGET_COV).abs().max()) for g in (0.1, 0.03, 0.01, 0.003)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-2 * float(TARGET_COV.abs().max())
    assert errors[0] > 0.1 * float(TARGET_COV.abs().max())  # ... while the bias at γ = 0.1 is large


# ---------------------------------------------------------------------------------------------
# Statistical: total variation, d = 2
# ---------------------------------------------------------------------------------------------

MU_TV, W_TV = f64([0.3, -0.2]), 1.0
GAMMA_TV, SIGMA_TV, STEPS_TV = 0.01, 5.0, 1000  # T = 10


def tv_moments():
    """π ∝ exp(−½‖x − μ‖² − w|x₂ − x₁|): δ = x₂ − x₁ has density ∝ exp(−(δ − m)²/4 − w|δ|),
    m = μ₂ − μ₁ (trapezoid on [−30, 30], h = 1e-4), independent of c = x₁ + x₂ ~ N(μ₁ + μ₂, 2)."""
    u = torch.linspace(-30.0, 30.0, 600001, dtype=torch.float64)
    p = torch.exp(-((u - float(MU_TV[1] - MU_TV[0])) ** 2) / 4 - W_TV * u.abs())
    p = p / torch.trapezoid(p, u)
    e1, eabs, e2, e4 = (float(torch.trapezoid(p * v, u)) for v in (u, u.abs(), u**2, u**4))
    return e1, eabs, e2 - e1**2, e2, e4


def tv_check(x):
    """n = 20000 chains' final states; SE parts Z·SE with SE from the exact moments (Var δ by
    √((μ₄ − σ⁴)/n), μ₄ taken about 0 — conservative by < 1%): ≈ 0.030 (E δ), 0.020 (E|δ|),
    0.043 (Var δ), 0.050 (E c), 0.050 (Var c). γ-bias of this chain, measured separately
    (n = 400000 chains, 1000 steps, seeds 11 and 12): E δ −0.0029 and −0.0030 (± 0.0014),
    E|δ| +0.0138 and +0.0137 (± 0.0009), Var δ +0.0204 and +0.0197 (± 0.0017), Var c 2.007 and
    2.011 (ULA on c: exact 2/(1 − γ/4) = 2.005); budgets 0.005, 0.02, 0.03 and 0.015 beside Z·SE."""
    if not bool(torch.isfinite(x).all()):
        return False
    e1, eabs, var, e2, e4 = tv_moments()
    n, d, c = x.shape[0], x[:, 1] - x[:, 0], x.sum(1)
    return (
        abs(float(d.mean()) - e1) <= Z * math.sqrt(var / n) + 0.005
        and abs(float(d.abs().mean()) - eabs) <= Z * math.sqrt((e2 - eabs**2) / n) + 0.02
        and abs(float(d.var()) - var) <= Z * math.sqrt((e4 - e2**2) / n) + 0.03
        and mean_within(c, float(MU_TV.sum()), math.sqrt(2.0))
        and abs(float(c.var()) - 2.0) <= Z * 2.0 * math.sqrt(2 / (n - 1)) + 0.015
    )


def test_tv_moments(generator):
    step = primal_dual_langevin(finite_difference_1d(2), tv_weight=W_TV, dual_step=SIGMA_TV)
    x = run(step, GaussianPotential(MU_TV), randn64(generator, N, 2), GAMMA_TV, STEPS_TV, generator)
    assert tv_check(x), (float((x[:, 1] - x[:, 0]).abs().mean()), float((x[:, 1] - x[:, 0]).var()))


def test_tv_negative_control_sign_flip(generator):
    step = primal_dual_langevin(negated_adjoint(finite_difference_1d(2)), tv_weight=W_TV, dual_step=SIGMA_TV)
    x = run(step, GaussianPotential(MU_TV), randn64(generator, N, 2), GAMMA_TV, STEPS_TV, generator)
    assert not tv_check(x)


def test_tv_negative_control_no_tv(generator):
    """Plain ULA on f alone (w = 0 in effect: Var δ = 2 instead of 0.74) fails the same check."""
    from implicit_diffusion.samplers import ula_step

    x = run(ula_step, GaussianPotential(MU_TV), randn64(generator, N, 2), GAMMA_TV, STEPS_TV, generator)
    assert not tv_check(x)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors():
    D = finite_difference_1d(3)
    with pytest.raises(ValueError, match="exactly one"):
        primal_dual_langevin(D)
    with pytest.raises(ValueError, match="exactly one"):
        primal_dual_langevin(D, 1.0, dual_prox=quadratic_dual_prox(1.0))
    for w in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tv_weight"):
            primal_dual_langevin(D, w)
    for s in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="dual_step"):
            primal_dual_langevin(D, 1.0, dual_step=s)
    for t in (-0.1, 1.5):
        with pytest.raises(ValueError, match="overrelaxation"):
            primal_dual_langevin(D, 1.0, overrelaxation=t)
    with pytest.raises(ValueError, match="LinearOperator"):
        PrimalDualLangevin(torch.eye(3), lambda y, s: y, 1.0)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="d must"):
            finite_difference_1d(bad)
    with pytest.raises(ValueError, match="at least 2 pixels"):
        finite_difference_2d(1, 1)
    with pytest.raises(ValueError, match="w must"):
        finite_difference_2d(2, 0)
    with pytest.raises(ValueError, match="alpha"):
        quadratic_dual_prox(0.0)
    with pytest.raises(ValueError, match=r"\(p, d\)"):
        dense_operator(torch.ones(3))
    step, V = primal_dual_langevin(D, 1.0), GaussianPotential(f64([0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"\(num_particles, 3\)"):
        step(f64([[0.0, 1.0]]), V, step_size=0.1, noise=f64([[0.0, 0.0]]))
    with pytest.raises(ValueError, match="step_size"):
        step(f64([[0.0, 1.0, 2.0]]), V, step_size=0.0, noise=f64([[0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="needs randomness"):
        step(f64([[0.0, 1.0, 2.0]]), V, step_size=0.1)


# ---------------------------------------------------------------------------------------------
# Inside an algorithm
# ---------------------------------------------------------------------------------------------


class ResetEvery:
    """The step, with its dual reset after every ``k`` calls: the shared helper runs SingleLoop and
    then the hand loop with one sampler, and each run must start from y = 0."""

    def __init__(self, step: PrimalDualLangevin, k: int):
        self.step, self.k, self.calls = step, k, 0

    def __call__(self, x, potential, **kwargs):
        out = self.step(x, potential, **kwargs)
        self.calls += 1
        if self.calls % self.k == 0:
            self.step.reset()
        return out


def test_runs_inside_single_loop(generator):
    est = RewardEstimator(lambda x: -((x - f64([2.0, -1.0, 0.5])) ** 2).sum(-1))
    step = ResetEvery(primal_dual_langevin(finite_difference_1d(3), tv_weight=0.5, dual_step=2.0), k=5)
    assert_single_loop_matches_hand_loop(GaussianPotential(torch.zeros(3, dtype=torch.float64)), est, step,
                                         randn64(generator, 300, 3), step_size=0.1, num_steps=5, min_change=0.01)
    assert step.calls == 10 and step.step.dual is None


def test_nested_loop_with_reset_callback(generator):
    """NestedLoop takes the step unchanged; with the documented callback every θ update's inner
    loop starts from y = 0, without it y is carried over from the previous update."""
    from implicit_diffusion.algorithms import NestedLoop

    for reset, expected in ((True, [True, False, False] * 3), (False, [True, False, False] + [False] * 6)):
        step = primal_dual_langevin(finite_difference_1d(3), tv_weight=0.5, dual_step=2.0)
        fresh = []

        def sampler(x, potential, **kwargs):
            fresh.append(step.dual is None)
            return step(x, potential, **kwargs)

        V = GaussianPotential(torch.zeros(3, dtype=torch.float64))
        est = RewardEstimator(lambda x: -((x - f64([2.0, -1.0, 0.5])) ** 2).sum(-1))
        algo = NestedLoop(V, est, torch.optim.SGD(V.parameters(), lr=0.1), init_fn=lambda g: randn64(g, 50, 3),
                          num_inner_steps=3, step_size=0.1, sampler=sampler)
        callbacks = [lambda k, x, stats: step.reset()] if reset else []
        x = algo.run(None, 3, generator=generator, callbacks=callbacks)
        assert fresh == expected and x.shape == (50, 3) and bool(torch.isfinite(x).all())
