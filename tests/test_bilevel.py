"""Implicit differentiation (CG, HVPs, Γ) and the bilevel algorithms, on exact closed forms.

Everything here is deterministic (full batches, float64): exact tests at 1e-10 unless a
tolerance is derived in the test. The random SPD systems use the ``generator`` fixture so
the CG checks run over a seed sweep.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close64, randn64

from implicit_diffusion.algorithms.bilevel import JointBilevel, NestedBilevel
from implicit_diffusion.models.regression import load_problem, minimize_1d
from implicit_diffusion.objectives.implicit import (
    conjugate_gradient,
    hessian_vector_product,
    implicit_surrogate,
    inner_gradient,
    linearize,
    outer_gradient,
)


@pytest.fixture(scope="module")
def ridge():
    return load_problem("ridge")


@pytest.fixture(scope="module")
def logistic():
    return load_problem("logistic")


@pytest.fixture(scope="module")
def ridge_theta_star(ridge):
    return minimize_1d(ridge.value, -12.0, 6.0, 361, tol=1e-12, derivative=ridge.derivative)


def _spd(generator, n: int) -> torch.Tensor:
    """A random SPD matrix with eigenvalues in [0.5, 10] (condition number ≤ 20)."""
    q, _ = torch.linalg.qr(randn64(generator, n, n))
    eig = 0.5 + 9.5 * torch.rand(n, generator=generator, dtype=torch.float64)
    return (q * eig) @ q.T


# ---------------------------------------------------------------- conjugate gradient


def test_cg_solves_an_spd_system_to_tolerance(generator):
    A, b = _spd(generator, 20), randn64(generator, 20)
    exact = torch.linalg.solve(A, b)
    res = conjugate_gradient(lambda v: A @ v, b, max_iter=200, tol=1e-12)
    assert res.residual_norm <= 1e-12
    assert float((b - A @ res.solution).norm()) <= 1e-11  # the reported residual is the true one (to rounding)
    assert_close64(res.solution, exact)
    assert res.iterations <= 40 and res.matvecs == res.iterations  # from 0: no product for r₀
    # a warm start at the solution: one product for r₀, no iteration
    warm = conjugate_gradient(lambda v: A @ v, b, exact, max_iter=50, tol=1e-10)
    assert warm.iterations == 0 and warm.matvecs == 1


def test_cg_steps_reduce_the_energy_error_and_are_exact_in_n_steps(generator):
    """CG minimises ‖v − v*‖_A over growing Krylov spaces: the A-norm error never increases, and
    for a 4×4 system 4 steps solve it exactly (up to rounding)."""
    A, b = _spd(generator, 4), randn64(generator, 4)
    exact = torch.linalg.solve(A, b)
    errs = []
    for k in range(5):
        e = conjugate_gradient(lambda v: A @ v, b, max_iter=k).solution - exact
        errs.append(float(e @ A @ e))
    assert all(e1 <= e0 * (1 + 1e-12) for e0, e1 in zip(errs, errs[1:]))
    assert errs[4] <= 1e-20 * errs[0]


def test_cg_rejects_bad_arguments():
    A = torch.eye(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_iter"):
        conjugate_gradient(lambda v: A @ v, torch.ones(2, dtype=torch.float64), max_iter=-1)
    with pytest.raises(ValueError, match="tol"):
        conjugate_gradient(lambda v: A @ v, torch.ones(2, dtype=torch.float64), max_iter=1, tol=-1.0)


# ---------------------------------------------------------------- HVP and the surrogate


def test_hvp_matches_the_dense_hessian(logistic, generator):
    d = logistic.A.shape[1]
    x, v, th = 0.1 * randn64(generator, d), randn64(generator, d), torch.tensor(-2.0, dtype=torch.float64)
    dense = torch.autograd.functional.hessian(lambda z: logistic.inner_loss(z, th), x)
    assert_close64(hessian_vector_product(logistic.inner_loss, x, th, v), dense @ v)


def test_surrogate_gradient_is_the_mixed_derivative_formula(logistic, generator):
    """Γ(x, θ) = ∇θ[−⟨∇ₓg(x, θ), v⟩] = −e^θ (m∘x)ᵀv since ∂θ∇ₓg = e^θ m∘x; x, v get no gradient."""
    d = logistic.A.shape[1]
    x, v = randn64(generator, d).requires_grad_(True), randn64(generator, d).requires_grad_(True)
    th = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    implicit_surrogate(logistic.inner_loss, x, th, v).backward()
    assert_close64(th.grad, -math.exp(-0.7) * (logistic.penalized * x.detach()) @ v.detach())
    assert x.grad is None and v.grad is None


def test_linearization_matches_the_standalone_products(logistic, generator):
    """The shared-graph ∇ₓg, HVPs and surrogate used by the algorithms equal the one-off functions."""
    d = logistic.A.shape[1]
    x, v, w = 0.1 * randn64(generator, d), randn64(generator, d), randn64(generator, d)
    th = torch.tensor(-1.3, dtype=torch.float64, requires_grad=True)
    lin = linearize(logistic.inner_loss, x, th)
    assert_close64(lin.grad, inner_gradient(logistic.inner_loss, x, th))
    for u in (v, w):  # several products from one graph
        assert_close64(lin.hvp(u), hessian_vector_product(logistic.inner_loss, x, th, u))
    (g1,) = torch.autograd.grad(lin.surrogate(v), th)
    (g2,) = torch.autograd.grad(implicit_surrogate(logistic.inner_loss, x, th, v), th)
    assert_close64(g1, g2)


def _hypergradient(problem, x, theta: float) -> float:
    """Γ at x: CG to 1e-13 on ∇²g v = ∇f(x), then the θ-gradient of the surrogate."""
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    rhs = outer_gradient(problem.outer_loss, x)
    v = conjugate_gradient(lambda u: hessian_vector_product(problem.inner_loss, x, th, u), rhs,
                           max_iter=500, tol=1e-13).solution
    implicit_surrogate(problem.inner_loss, x, th, v).backward()
    return float(th.grad)


@pytest.mark.parametrize("theta", [-4.0, -1.0, 1.5])
def test_ridge_hypergradient_at_x_star_equals_finite_differences_and_autograd(ridge, theta):
    """At the exact x*(θ), Γ is ∇ℓ(θ). Against (a) autograd through the closed-form solve
    x*(θ) = (AᵀA/n + e^θI)⁻¹Aᵀb/n at 1e-10; (b) central differences of the closed-form ℓ with
    h = 1e-4: truncation h²|ℓ'''|/6 ≲ 1e-10 and rounding ε|ℓ|/h ≈ 1e-12, so 1e-8 absolute."""
    x_star = ridge.solve(theta)
    gamma = _hypergradient(ridge, x_star, theta)

    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    n, d = ridge.A.shape
    eye = torch.eye(d, dtype=torch.float64)
    x = torch.linalg.solve(ridge.A.T @ ridge.A / n + th.exp() * eye, ridge.A.T @ ridge.b / n)
    ridge.outer_loss(x).backward()
    assert abs(gamma - float(th.grad)) <= 1e-10 * max(1.0, abs(float(th.grad)))

    h = 1e-4
    fd = (ridge.value(theta + h) - ridge.value(theta - h)) / (2 * h)
    assert abs(gamma - fd) <= 1e-8
    assert abs(gamma) > 1e-4  # not a trivial zero: these θ are away from θ* ≈ −1.74
    assert abs(gamma - ridge.derivative(theta)) <= 1e-10 * max(1.0, abs(gamma))


def test_logistic_hypergradient_at_x_star_equals_finite_differences(logistic):
    """Logistic: x*(θ) by Newton (‖step‖∞ ≤ 1e-13); central differences with h = 1e-4, 1e-8 absolute
    (the inner solve's error enters ℓ at second order)."""
    theta = -3.0
    gamma = _hypergradient(logistic, logistic.solve(theta), theta)
    h = 1e-4
    fd = (logistic.value(theta + h) - logistic.value(theta - h)) / (2 * h)
    assert abs(gamma - fd) <= 1e-8 and abs(gamma) > 1e-4


def test_reference_optimum_is_a_stationary_point(ridge, ridge_theta_star):
    assert abs(ridge.derivative(ridge_theta_star)) <= 1e-12
    for t in (ridge_theta_star - 0.1, ridge_theta_star + 0.1):
        assert ridge.value(t) > ridge.value(ridge_theta_star)


# ---------------------------------------------------------------- the algorithms


def _joint(problem, theta0: float, lr: float, cls=JointBilevel, outer=None, **kw):
    th = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    eta = 1.0 / (problem.curvature_bound() + 1.0)  # 1/L for every θ ≤ 0 (e^θ ≤ 1)
    algo = cls(problem.inner_loss, outer or problem.outer_loss, th, torch.optim.SGD([th], lr=lr), step_size=eta, **kw)
    return algo, th, eta


def test_joint_single_loop_matches_a_hand_written_loop(ridge):
    """Each iteration: v ← CG(2 steps, warm) at (x_k, θ_k); Γ = −e^θ x_kᵀv; x ← x − η∇ₓg(x, θ_k) twice;
    θ ← θ − εΓ."""
    algo, th, eta = _joint(ridge, 0.5, 3.0, inner_steps_per_update=2, cg_steps=2)
    x0 = torch.zeros(ridge.A.shape[1], dtype=torch.float64)
    x = algo.run(x0, 7)
    xr, theta, v = x0, 0.5, None
    for _ in range(7):
        t = torch.tensor(theta, dtype=torch.float64)
        res = conjugate_gradient(lambda u: hessian_vector_product(ridge.inner_loss, xr, t, u),
                                 outer_gradient(ridge.outer_loss, xr), v, max_iter=2)
        v = res.solution
        gamma = -math.exp(theta) * float(xr @ v)
        for _ in range(2):
            xr = xr - eta * inner_gradient(ridge.inner_loss, xr, t)
        theta -= 3.0 * gamma
    assert_close64(x, xr)
    assert_close64(th.detach(), torch.tensor(theta, dtype=torch.float64))
    assert algo.inner_steps == 14 and algo.updates == 7
    assert algo.hvps == 2 + 6 * 3  # first call from v = 0: 2 products; then 1 (warm r₀) + 2 per call
    assert not x.requires_grad and x.grad_fn is None


def test_joint_single_loop_converges_to_theta_star_on_ridge(ridge, ridge_theta_star):
    """Deterministic, fixed step sizes: the joint iteration's fixed point is (x*(θ*), v*(θ*), θ*)
    exactly (Γ vanishes only where ∇ℓ does), and it converges linearly. Measured |θ₆₀₀ − θ*| ≈ 1e-11
    from θ₀ = 0 (distance 1.74); 1e-8 leaves three orders of margin and is far below anything a
    biased Γ reaches (the negative controls below land 0.95 and > 1 away)."""
    algo, th, _ = _joint(ridge, 0.0, 30.0)
    algo.run(torch.zeros(ridge.A.shape[1], dtype=torch.float64), 600)
    assert abs(float(th.detach()) - ridge_theta_star) <= 1e-8


class _NoSolve(JointBilevel):
    """Wrong Γ: v = ∇f(x) (the inverse Hessian dropped from the implicit term)."""

    def _refine_v(self, lin, rhs, max_iter, tol, warm):
        self.v = rhs  # rhs = ∇f(x_k)
        return rhs


def test_negative_controls_do_not_converge_to_theta_star(ridge, ridge_theta_star):
    """The same check fails for Γ without the linear solve and for Γ with the wrong sign."""
    x0 = torch.zeros(ridge.A.shape[1], dtype=torch.float64)
    algo, th, _ = _joint(ridge, 0.0, 30.0, cls=_NoSolve)
    algo.run(x0, 600)
    assert abs(float(th.detach()) - ridge_theta_star) > 0.5  # measured 0.95
    algo, th, _ = _joint(ridge, 0.0, 30.0, outer=lambda x: -ridge.outer_loss(x))  # flips v, hence Γ
    algo.run(x0, 600)
    assert abs(float(th.detach()) - ridge_theta_star) > 1.0


def test_nested_is_gradient_descent_on_the_exact_objective(ridge):
    """With the inner problem solved to ‖∇ₓg‖ ≤ 1e-10 and CG to 1e-12, each nested update is
    θ ← θ − ε ℓ'(θ) with the exact ℓ' (dense closed form), up to the solves' errors: ‖x − x*‖ ≤
    1e-10/μ with μ ≥ e^θ ≥ e^−2 gives |Γ − ℓ'| ≲ 1e-9 per update, times ε = 30 and summed over 15
    updates (contracting): 1e-6 bounds it. The last x is the inner solution at the last θ before the update."""
    algo, th, _ = _joint(ridge, 0.0, 30.0, cls=NestedBilevel, inner_tol=1e-10, max_inner_steps=100_000,
                         cg_tol=1e-12, max_cg_steps=100)
    thetas = []
    x = algo.run(torch.zeros(ridge.A.shape[1], dtype=torch.float64), 15,
                 callbacks=[lambda k, x, s: thetas.append(float(th.detach()))])
    ref = 0.0
    for k in range(15):
        before = ref
        ref -= 30.0 * ridge.derivative(ref)
        assert abs(thetas[k] - ref) <= 1e-6
    assert thetas[-1] < -1.5  # the path moved most of the way from θ₀ = 0 towards θ* ≈ −1.74
    assert float((x - ridge.solve(before)).norm()) <= 1e-8
    assert algo.updates == 15 and algo.inner_steps > 15


def test_nested_without_warm_start_restarts_from_x0(ridge):
    """warm_start=False: every update solves from the first x (and v from 0), so the inner step
    count per update equals that of a solve from x0, and x is that solve's result."""
    kw = dict(inner_tol=1e-8, max_inner_steps=100_000, cg_tol=1e-10, max_cg_steps=100)
    algo, th, _ = _joint(ridge, 0.0, 5.0, cls=NestedBilevel, warm_start=False, **kw)
    x0 = torch.zeros(ridge.A.shape[1], dtype=torch.float64)
    algo.run(x0, 2)
    theta1 = float(th.detach())
    before = algo.inner_steps
    x = algo.run(x0, 1)
    ref, _, _ = _joint(ridge, theta1, 5.0, cls=NestedBilevel, **kw)
    xr = ref.run(x0, 1)
    assert algo.inner_steps - before == ref.inner_steps
    assert_close64(x, xr)


def test_algorithms_reject_bad_arguments(ridge):
    th = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))
    opt = torch.optim.SGD([th], lr=1.0)
    with pytest.raises(ValueError, match="step_size"):
        JointBilevel(ridge.inner_loss, ridge.outer_loss, th, opt, step_size=0.0)
    with pytest.raises(ValueError, match="cg_steps"):
        JointBilevel(ridge.inner_loss, ridge.outer_loss, th, opt, step_size=0.1, cg_steps=0)
    with pytest.raises(ValueError, match="inner_steps_per_update"):
        JointBilevel(ridge.inner_loss, ridge.outer_loss, th, opt, step_size=0.1, inner_steps_per_update=0)
    with pytest.raises(ValueError, match="max_inner_steps"):
        NestedBilevel(ridge.inner_loss, ridge.outer_loss, th, opt, step_size=0.1, inner_tol=0.0, max_inner_steps=0,
                      cg_tol=0.0, max_cg_steps=1)
    with pytest.raises(ValueError, match="theta must require grad"):
        JointBilevel(ridge.inner_loss, ridge.outer_loss, torch.tensor(0.0), opt, step_size=0.1)
