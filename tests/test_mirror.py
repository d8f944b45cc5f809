"""Mirrored Langevin (samplers/mirror.py): exact map checks, Gamma and Dirichlet targets with
negative controls, input validation, and use inside SingleLoop.

Statistical tolerances = Z·SE (n i.i.d. chain end-points) + a discretisation-bias allowance.
Bias measured once with 200 000 chains, T = 10: orthant Gamma(3, 2) variance (0.75) came out
0.816 / 0.785 / 0.771 / 0.757 at γ = 0.04 / 0.02 / 0.01 / 0.0025 (bias ≈ 2γ), mean within
0.003 of 1.5 at every γ; simplex Dirichlet(2, 3, 4) at γ = 0.04: means within 3e-4, variances
3-4 % high. Allowances below are ~1.5× these at the γ used.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z

from implicit_diffusion.algorithms import SingleLoop
from implicit_diffusion.models import FunctionPotential
from implicit_diffusion.objectives import RewardEstimator
from implicit_diffusion.samplers.langevin import ula_step
from implicit_diffusion.samplers.mirror import _DOMAINS, mirror_langevin

A, B = 3.0, 2.0  # Gamma(shape a, rate b): mean a/b = 1.5, var a/b² = 0.75, excess kurtosis 6/a
ALPHA = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)


def gamma_v(a: float = A):
    return lambda x: (-(a - 1.0) * torch.log(x) + B * x).sum(-1)


def with_last(x):
    return torch.cat([x, 1.0 - x.sum(-1, keepdim=True)], -1)


def dirichlet_v(alpha):
    return lambda x: -((alpha - 1.0) * torch.log(with_last(x))).sum(-1)


def run(step, V, x, gamma, steps, generator):
    with torch.no_grad():
        for _ in range(steps):
            x, _ = step(x, V, step_size=gamma, generator=generator)
    return x


def moments_ok(s, mean, var, kurt, mean_bias, var_bias) -> bool:
    """|s̄ − μ| ≤ Z·σ/√n + mean_bias and |s² − σ²| ≤ Z·σ²√((2 + κ)/n) + var_bias (κ = excess kurtosis)."""
    n = s.numel()
    ok_m = abs(float(s.mean()) - mean) <= Z * math.sqrt(var / n) + mean_bias
    ok_v = abs(float(s.var()) - var) <= Z * var * math.sqrt((2.0 + kurt) / n) + var_bias
    return ok_m and ok_v


def beta_moments(p: float, q: float):
    s = p + q
    kurt = 6 * ((p - q) ** 2 * (s + 1) - p * q * (s + 2)) / (p * q * (s + 2) * (s + 3))
    return p / s, p * q / (s * s * (s + 1)), kurt


def dirichlet_ok(x, alpha, var_rel_bias=0.05, mean_bias=0.002) -> bool:
    full, a0 = with_last(x), float(alpha.sum())
    return all(
        moments_ok(full[:, i], *beta_moments(float(alpha[i]), a0 - float(alpha[i])),
                   mean_bias, var_rel_bias * beta_moments(float(alpha[i]), a0 - float(alpha[i]))[1])
        for i in range(len(alpha))
    )


# ---------------------------------------------------------------- exact: the maps


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func import
@pytest.mark.parametrize("domain", ["orthant", "simplex"])
def test_maps_invert_and_logdet_matches_jacfwd(domain, generator):
    to_dual, to_primal, grad_w, _, _ = _DOMAINS[domain]
    x = torch.softmax(torch.randn(5, 4, generator=generator, dtype=torch.float64), -1)[:, :3]
    torch.testing.assert_close(to_primal(to_dual(x)), x, rtol=1e-10, atol=1e-12)
    y = to_dual(x)
    for yi, xi in zip(y, x):
        J = torch.func.jacfwd(lambda v: to_primal(v[None])[0])(yi)
        full = with_last(xi[None])[0] if domain == "simplex" else xi
        torch.testing.assert_close(torch.linalg.slogdet(J)[1], torch.log(full).sum(), rtol=1e-10, atol=1e-12)
    # closed-form ∇W against autograd of W(y) = V(∇φ*(y)) − log|det J(y)| for a non-separable V
    V = lambda x: (x.sum(-1) ** 2 + torch.sin(x).prod(-1))  # noqa: E731
    yr = y.clone().requires_grad_(True)
    logdet = torch.stack([torch.linalg.slogdet(torch.func.jacfwd(lambda v: to_primal(v[None])[0])(v))[1] for v in yr])
    (auto,) = torch.autograd.grad((V(to_primal(yr)) - logdet).sum(), yr)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(V(xr).sum(), xr)
    torch.testing.assert_close(grad_w(x, g), auto, rtol=1e-10, atol=1e-12)


def test_step_with_fixed_noise_is_dual_ula():
    """x' = ∇φ*(∇φ(x) − γ∇W + √(2γ)z) by hand for Dirichlet(α) on the simplex: ∇W = −α_{≤d} + α₀x."""
    x, z, gamma = torch.tensor([[0.2, 0.5]], dtype=torch.float64), torch.tensor([[0.3, -1.0]], dtype=torch.float64), 0.1
    x1, info = mirror_langevin("simplex")(x, dirichlet_v(ALPHA), step_size=gamma, noise=z)
    y = torch.log(x / 0.3) - gamma * (-ALPHA[:2] + 9.0 * x) + math.sqrt(2 * gamma) * z
    expected = torch.exp(y) / (1 + torch.exp(y).sum())
    torch.testing.assert_close(x1, expected, rtol=1e-10, atol=1e-12)
    assert info.acceptance_rate is None


# ---------------------------------------------------------------- statistical


def test_orthant_gamma_target_and_controls(generator):
    """Gamma(3, 2), n = 4 000 chains from the mean, γ = 0.01, T = 3 (W'' = 3 at the mode: e^{−9}).
    Mean tol 5·0.866/√n + 0.01 = 0.078; var tol 5·0.75·√(4/n) + 0.03 = 0.149 (bias allowance 3γ).
    Controls: without the log-det term the sampler targets Gamma(a − 1, b) (mean 1, var 0.5) — fails
    the check, matches its own law;
    plain ULA in the primal space leaves the orthant."""
    n, gamma, steps = 4_000, 0.01, 300
    x0 = torch.full((n, 1), A / B, dtype=torch.float64)
    x = run(mirror_langevin("orthant"), gamma_v(), x0, gamma, steps, generator)
    assert (x > 0).all() and torch.isfinite(x).all()
    assert moments_ok(x, A / B, A / B**2, 6 / A, 0.01, 3 * gamma)
    # dropping log det J = Σ log x equals the correct sampler on V + Σ log x = Gamma(a − 1, b)'s potential
    x_wrong = run(mirror_langevin("orthant"), gamma_v(A - 1), x0, gamma, steps, generator)
    assert not moments_ok(x_wrong, A / B, A / B**2, 6 / A, 0.01, 3 * gamma)
    assert moments_ok(x_wrong, (A - 1) / B, (A - 1) / B**2, 6 / (A - 1), 0.01, 3 * gamma)
    # primal ULA: some chain steps to x ≤ 0 (where log x is undefined) within the same budget
    xp, left = x0.clone(), False
    with torch.no_grad():
        for _ in range(steps):
            xp, _ = ula_step(xp, lambda v: gamma_v()(v.abs().clamp_min(1e-300)), step_size=gamma, generator=generator)
            left = left or bool((xp <= 0).any())
            if left:
                break
            xp = xp.abs().clamp_min(1e-300)  # reflect so the run can go on
    assert left


def test_simplex_dirichlet_target_and_control(generator):
    """Dirichlet(2, 3, 4) (d = 2), n = 2 000 chains, γ = 0.025, T = 6. Each xᵢ ~ Beta(αᵢ, α₀ − αᵢ):
    mean tol 5·σᵢ/√n + 0.002 (≤ 0.02), var tol 5·σᵢ²√((2 + κᵢ)/n) + 5 % σᵢ². Control: without the log-det
    term (Σ_{i≤3} log xᵢ) the sampler targets e^{−V−Σ log xᵢ} = Dirichlet(α − 1) = Dirichlet(1, 2, 3)
    (means 1/6, 1/3, 1/2 instead of 2/9, 1/3, 4/9)."""
    n, gamma, steps = 2_000, 0.025, 240
    x0 = torch.full((n, 2), 1.0 / 3.0, dtype=torch.float64)
    x = run(mirror_langevin("simplex"), dirichlet_v(ALPHA), x0, gamma, steps, generator)
    assert (x > 0).all() and (x.sum(-1) < 1).all()
    assert dirichlet_ok(x, ALPHA)
    x_wrong = run(mirror_langevin("simplex"), dirichlet_v(ALPHA - 1), x0, gamma, steps, generator)
    assert not dirichlet_ok(x_wrong, ALPHA)
    assert dirichlet_ok(x_wrong, ALPHA - 1)


# ---------------------------------------------------------------- errors


def test_errors():
    with pytest.raises(ValueError, match="'orthant', 'simplex'"):
        mirror_langevin("cube")
    V = gamma_v()
    with pytest.raises(ValueError, match="2 of 3 particles lie outside the positive orthant"):
        mirror_langevin("orthant")(torch.tensor([[1.0], [0.0], [-1.0]]), V, step_size=0.1, noise=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="1 of 2 particles lie outside the open simplex"):
        mirror_langevin("simplex")(torch.tensor([[0.2, 0.3], [0.6, 0.4]]), V, step_size=0.1, noise=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="needs randomness"):
        mirror_langevin("simplex")(torch.tensor([[0.2, 0.3]]), V, step_size=0.1)
    with pytest.raises(ValueError, match="step_size"):
        mirror_langevin("orthant")(torch.ones(1, 1), V, step_size=0.0, noise=torch.zeros(1, 1))


# ---------------------------------------------------------------- end-to-end


def test_single_loop_dirichlet(generator):
    """Learn log-α of a Dirichlet on the simplex to raise the reward x₁; θ₁ must go up, the
    particles stay strictly inside and carry no autograd history."""
    V = FunctionPotential(lambda x, th: -((torch.exp(th) - 1.0) * torch.log(with_last(x))).sum(-1),
                          torch.log(ALPHA))  # θ = log α
    algo = SingleLoop(V, RewardEstimator(lambda x: x[:, 0]), torch.optim.SGD(V.parameters(), lr=0.5),
                      step_size=0.02, sampler=mirror_langevin("simplex"))
    x = algo.run(torch.full((500, 2), 1.0 / 3.0, dtype=torch.float64), 40, generator=generator)
    assert V.theta[0] > math.log(2.0) + 0.02 and V.theta.grad is not None
    assert (x > 0).all() and (x.sum(-1) < 1).all()
    assert not x.requires_grad and x.grad_fn is None
