"""Preconditioned Langevin x' = x − γP∇V(x) + √(2γ)Lz: the exact step (matrix and diagonal P),
the exact AR(1) stationary law on an ill-conditioned Gaussian with P = Σ (negative controls:
√γ noise, and the continuous-time law Σ itself), the mixing gain over ULA at equal γ and step
count, input validation, use inside SingleLoop, and the inverse-Hessian preconditioner (exact:
Σ back from a Gaussian potential, the mean Hessian over points, the eigenvalue floor)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z, assert_close64, assert_single_loop_matches_hand_loop, f64, mean_within, randn64, var_within

from implicit_diffusion.models import FunctionPotential, GaussianPotential
from implicit_diffusion.objectives import RewardEstimator
from implicit_diffusion.samplers import LangevinInfo, inverse_hessian, preconditioned_langevin, ula_step

# Σ = R diag(100, 1) Rᵀ, R the rotation by 30°: condition number 100, axes off the coordinates.
ANGLE = math.pi / 6
U_SLOW = f64([math.cos(ANGLE), math.sin(ANGLE)])  # eigenvector of Σ with eigenvalue 100
_R = f64([[math.cos(ANGLE), -math.sin(ANGLE)], [math.sin(ANGLE), math.cos(ANGLE)]])
SIGMA = _R @ torch.diag(f64([100.0, 1.0])) @ _R.T
MU = f64([1.0, -2.0])
N = 20_000  # independent chains; one final state per chain


def gaussian_potential() -> FunctionPotential:
    """V(x) = ½(x − μ)ᵀΣ⁻¹(x − μ) (GaussianPotential is isotropic only)."""
    prec = torch.linalg.inv(SIGMA)
    return FunctionPotential(lambda x, mu: 0.5 * (((x - mu) @ prec) * (x - mu)).sum(-1), MU)


def run_chain(step, V, x0, gamma, num_steps, generator, noise_scale=1.0):
    x = x0.clone()
    with torch.no_grad():
        for _ in range(num_steps):
            x, _ = step(x, V, step_size=gamma, noise=noise_scale * randn64(generator, *x.shape))
    return x


def cov_within(samples: torch.Tensor, cov: torch.Tensor, z: float = Z) -> bool:
    """Every entry |ŝ_ij − C_ij| ≤ z·SE, SE² = (C_ij² + C_ii C_jj)/(n − 1) for Gaussian draws."""
    n = samples.shape[0]
    s = torch.cov(samples.T)
    se = ((cov**2 + torch.outer(cov.diagonal(), cov.diagonal())) / (n - 1)).sqrt()
    return bool(((s - cov).abs() <= z * se).all())


# ---------------------------------------------------------------------------------------------
# Exact: one step with fixed noise
# ---------------------------------------------------------------------------------------------


def test_matrix_step_matches_hand_computation(generator):
    """P = [[2, .5], [.5, 1]], L = [[√2, 0], [.5/√2, √(7/8)]], V = ‖x − m‖²/(2·0.7)."""
    V = GaussianPotential(f64([0.5, -1.0]), 0.7)
    x, z, gamma = randn64(generator, 4, 2), randn64(generator, 4, 2), 0.3
    x1, info = preconditioned_langevin(f64([[2.0, 0.5], [0.5, 1.0]]))(x, V, step_size=gamma, noise=z)
    L = [[math.sqrt(2.0), 0.0], [0.5 / math.sqrt(2.0), math.sqrt(7 / 8)]]
    s = math.sqrt(2 * gamma)
    expected = []
    for (a, b), (z0, z1) in zip(x.tolist(), z.tolist()):
        ga, gb = (a - 0.5) / 0.7, (b + 1.0) / 0.7
        expected.append([
            a - gamma * (2.0 * ga + 0.5 * gb) + s * L[0][0] * z0,
            b - gamma * (0.5 * ga + 1.0 * gb) + s * (L[1][0] * z0 + L[1][1] * z1),
        ])
    assert_close64(x1, f64(expected))
    assert info == LangevinInfo()


def test_diagonal_step_matches_hand_computation_and_the_diagonal_matrix(generator):
    V = GaussianPotential(f64([0.5, -1.0]), 0.7)
    x, z, gamma, p = randn64(generator, 4, 2), randn64(generator, 4, 2), 0.3, [2.0, 0.25]
    x1, _ = preconditioned_langevin(f64(p))(x, V, step_size=gamma, noise=z)
    g = (x - f64([0.5, -1.0])) / 0.7
    expected = [[xi - gamma * pi * gi + math.sqrt(2 * gamma * pi) * zi for xi, gi, zi, pi in zip(*r, p)]
                for r in zip(x.tolist(), g.tolist(), z.tolist())]
    assert_close64(x1, f64(expected))
    x2, _ = preconditioned_langevin(torch.diag(f64(p)))(x, V, step_size=gamma, noise=z)
    assert_close64(x2, x1)


def test_identity_is_ula_and_invariants(generator):
    """P = I reproduces ula_step with the same generator; dtype kept, input not mutated."""
    V = GaussianPotential(f64([0.5, -1.0]), 0.7)
    x = randn64(generator, 5, 2)
    x_copy = x.clone()
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for P in (torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)):
        ga.manual_seed(3), gb.manual_seed(3)
        assert_close64(preconditioned_langevin(P)(x, V, step_size=0.2, generator=ga)[0],
                       ula_step(x, V, step_size=0.2, generator=gb)[0])
    assert torch.equal(x, x_copy)
    step = preconditioned_langevin(f64([[2.0, 0.5], [0.5, 1.0]]))
    out, _ = step(x.float(), GaussianPotential(torch.zeros(2)), step_size=0.1, generator=ga)
    assert out.dtype == torch.float32 and out.shape == (5, 2)
    assert step.__name__ == "preconditioned_langevin_step" and "matrix (2, 2)" in step.__doc__


# ---------------------------------------------------------------------------------------------
# Statistical: the exact stationary law of the discretised chain with P = Σ
# ---------------------------------------------------------------------------------------------


def test_stationary_covariance_with_p_sigma(generator):
    """With P = Σ, x' − μ = (1 − γ)(x − μ) + √(2γ)Lz: an AR(1) whose stationary covariance is
    C = 2γΣ/(1 − (1 − γ)²) = Σ·2/(2 − γ): at γ = 0.5, Σ = [[75.25, 42.87], [42.87, 25.75]] and
    C = 4Σ/3 = [[100.33, 57.16], [57.16, 34.33]].
    From x₀ = 0, K = 40 steps leave a residual factor 0.5⁴⁰ ≈ 1e-12 on the mean, 0.25⁴⁰ on C.

    N = 20,000 chains, final states i.i.d.: each mean within Z·√(C_ii/N) (≈ ±0.35, ±0.21),
    each ŝ_ij within Z·√((C_ij² + C_ii C_jj)/(N − 1)) (≈ ±5.0, ±2.9, ±1.7 for 11, 12, 22).
    Negative controls: noise √γ instead of √(2γ) (stationary C/2), and the continuous-time law
    Σ itself (the discretisation bias 2/(2 − γ) = 4/3 is resolved)."""
    gamma, K = 0.5, 40
    step, V = preconditioned_langevin(SIGMA), gaussian_potential()
    x = run_chain(step, V, torch.zeros(N, 2, dtype=torch.float64), gamma, K, generator)
    C = SIGMA * 2 / (2 - gamma)
    for i in range(2):
        assert mean_within(x[:, i], float(MU[i]), math.sqrt(C[i, i]))
    assert cov_within(x, C), torch.cov(x.T)
    assert not cov_within(x, SIGMA)
    wrong = run_chain(step, V, torch.zeros(N, 2, dtype=torch.float64), gamma, K, generator, 1 / math.sqrt(2))
    assert not cov_within(wrong, C)
    assert cov_within(wrong, C / 2)


def test_preconditioning_mixes_where_ula_does_not(generator):
    """Same γ = 0.5, same K = 30 steps, same start x₀ = μ + 10·u (u the slow eigenvector of Σ,
    eigenvalue 100). ULA is stable here (γ < 2/λ_max(Σ⁻¹) = 2) but along u it is the AR(1)
    y' = (1 − γ/100)y + √(2γ)z: contraction c = 0.995, so after K steps
        mean = 10·c^K = 8.604,   var = v∞(1 − c^{2K}) = 100.25·(1 − 0.7403) = 26.04,
    with v∞ = 2γ/(1 − c²) = 100.25. Preconditioned (P = Σ): contraction 0.5 in every direction,
        mean = 10·0.5^30 ≈ 9e-9,  var = (400/3)(1 − 0.25^30) = 133.33 (stationary).
    Checks on the projection onto u, N = 20,000 chains, SE tolerances as in the test above
    (var: Z·v·√(2/(N − 1)) = ±6.7 at 133, ±1.3 at 26): the preconditioned chain is stationary;
    ULA matches its own exact K-step law and fails the stationary check (the negative control)."""
    gamma, K = 0.5, 30
    V = gaussian_potential()
    x0 = (MU + 10 * U_SLOW).expand(N, 2)
    pre = run_chain(preconditioned_langevin(SIGMA), V, x0, gamma, K, generator) @ U_SLOW
    ula = run_chain(ula_step, V, x0, gamma, K, generator) @ U_SLOW
    mu_u, c = float(MU @ U_SLOW), 1 - gamma / 100
    v_stat, v_inf = 100 * 2 / (2 - gamma), 2 * gamma / (1 - c**2)
    assert var_within(pre, v_stat) and mean_within(pre, mu_u, math.sqrt(v_stat))
    v_ula = v_inf * (1 - c ** (2 * K))
    assert var_within(ula, v_ula) and mean_within(ula, mu_u + 10 * c**K, math.sqrt(v_ula))
    assert not var_within(ula, v_stat) and not mean_within(ula, mu_u, math.sqrt(v_stat))


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("P", "match"),
    [
        ([[1.0, 0.5], [0.0, 1.0]], "symmetric"),
        ([[1.0, 2.0], [2.0, 1.0]], "positive definite"),
        ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], "square"),
        ([[[1.0]]], "shape"),
        (1.0, "shape"),
        ([1.0, -1.0], "> 0"),
        ([1.0, 0.0], "> 0"),
        ([1.0, float("nan")], "finite"),
    ],
)
def test_invalid_preconditioner(P, match):
    with pytest.raises(ValueError, match=match):
        preconditioned_langevin(f64(P))


def test_invalid_step_arguments():
    V = GaussianPotential(torch.zeros(3))
    for P in (torch.eye(2), torch.ones(2)):
        with pytest.raises(ValueError, match=r"\(num_particles, 2\).*\(5, 3\)"):
            preconditioned_langevin(P)(torch.zeros(5, 3), V, step_size=0.1, noise=torch.zeros(5, 3))
        with pytest.raises(ValueError, match="shape"):
            preconditioned_langevin(P)(torch.zeros(2), V, step_size=0.1, noise=torch.zeros(2))
    step, x = preconditioned_langevin(torch.ones(3)), torch.zeros(4, 3)
    with pytest.raises(ValueError, match="needs randomness"):
        step(x, V, step_size=0.1)
    with pytest.raises(ValueError, match="step_size"):
        step(x, V, step_size=0.0, noise=x)


# ---------------------------------------------------------------------------------------------
# Inside an algorithm
# ---------------------------------------------------------------------------------------------


def test_runs_inside_single_loop(generator):
    """SingleLoop(sampler=preconditioned_langevin(P)): particles equal a hand-written loop with
    the same θ updates, θ moves, and no autograd history is carried."""
    est = RewardEstimator(lambda x: -((x - f64([2.0, -1.0])) ** 2).sum(-1))
    sampler = preconditioned_langevin(f64([[2.0, 0.5], [0.5, 1.0]]))
    assert_single_loop_matches_hand_loop(GaussianPotential(torch.zeros(2, dtype=torch.float64)), est, sampler,
                                         randn64(generator, 300, 2), step_size=0.2, min_change=0.01)


# ---------------------------------------------------------------------------------------------
# The inverse-Hessian preconditioner
# ---------------------------------------------------------------------------------------------


def test_inverse_hessian_of_a_gaussian_is_its_covariance(generator):
    """V = ½(x − μ)ᵀΣ⁻¹(x − μ): ∇²V = Σ⁻¹ everywhere, so P = Σ (condition number 100), from one
    point or from a batch; and the step built from it is the one built from Σ."""
    V = gaussian_potential()
    for x in (f64([3.0, -1.0]), randn64(generator, 7, 2)):
        P = inverse_hessian(V, x)
        assert_close64(P, SIGMA)
        assert not P.requires_grad and P.shape == (2, 2)
    x, z = randn64(generator, 4, 2), randn64(generator, 4, 2)
    P = inverse_hessian(V, x, min_eigenvalue=1e-6)
    assert_close64(preconditioned_langevin(P)(x, V, step_size=0.1, noise=z)[0],
                   preconditioned_langevin(SIGMA)(x, V, step_size=0.1, noise=z)[0])


def quartic():
    """V(x) = x₁⁴/4 + x₂⁴/4 + a·x₁x₂ with a = θ = 0.5: ∇²V(x) = [[3x₁², a], [a, 3x₂²]]."""
    return FunctionPotential(lambda x, a: (x**4).sum(-1) / 4 + a * x[:, 0] * x[:, 1], f64(0.5))


def test_inverse_hessian_averages_over_points():
    """Points (1, 2) and (2, 0): mean Hessian [[7.5, 0.5], [0.5, 6]], inverted by hand."""
    P = inverse_hessian(quartic(), f64([[1.0, 2.0], [2.0, 0.0]]))
    H = f64([[7.5, 0.5], [0.5, 6.0]])
    det = 7.5 * 6.0 - 0.25
    assert_close64(P, f64([[6.0, -0.5], [-0.5, 7.5]]) / det)
    assert_close64(P @ H, torch.eye(2, dtype=torch.float64))


def test_inverse_hessian_floors_negative_curvature():
    """V = (x₁² − 1)² + x₂²/2 at x = 0: ∇²V = diag(−4, 1). The floor λ_min = 0.1 gives
    P = diag(1/0.1, 1) = diag(10, 1): SPD, eigenvalues ≤ 1/λ_min; it plugs into the step.
    At the wells x₁ = ±1 (∇²V = diag(8, 1)) the mean over both is diag(8, 1): no floor."""
    V = FunctionPotential(lambda x, c: (x[:, 0] ** 2 - c) ** 2 + x[:, 1] ** 2 / 2, f64(1.0))
    P = inverse_hessian(V, f64([0.0, 0.0]), min_eigenvalue=0.1)
    assert_close64(P, torch.diag(f64([10.0, 1.0])))
    evals = torch.linalg.eigvalsh(P)
    assert float(evals.min()) > 0 and float(evals.max()) <= 1 / 0.1 + 1e-12
    preconditioned_langevin(P)  # accepted as SPD
    # an affine V has ∇²V = 0 everywhere: every eigenvalue is floored, P = I/λ_min
    assert_close64(inverse_hessian(lambda x: x.sum(-1), f64([[1.0, 2.0]]), min_eigenvalue=0.25),
                   4 * torch.eye(2, dtype=torch.float64))
    # a batch straddling the barrier: mean Hessian diag(mean(12x₁² − 4), 1)
    x = f64([[0.1, 0.0], [0.2, 1.0], [-0.3, 2.0]])
    h11 = float((12 * x[:, 0] ** 2 - 4).mean())  # = −3.44 < 0: floored
    assert h11 < 0
    assert_close64(inverse_hessian(V, x, min_eigenvalue=0.5), torch.diag(f64([2.0, 1.0])))
    assert_close64(inverse_hessian(V, f64([[1.0, 0.0], [-1.0, 3.0]])), torch.diag(f64([1 / 8, 1.0])))


def test_inverse_hessian_errors():
    V = gaussian_potential()
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_eigenvalue"):
            inverse_hessian(V, f64([0.0, 0.0]), min_eigenvalue=bad)
    for x in (torch.zeros(2, 2, 2, dtype=torch.float64), torch.zeros(0, 2, dtype=torch.float64), f64(1.0)):
        with pytest.raises(ValueError, match="shape"):
            inverse_hessian(V, x)
    with pytest.raises(ValueError, match="finite"):
        inverse_hessian(V, f64([0.0, float("nan")]))
    with pytest.raises(ValueError, match="one value per particle"):
        inverse_hessian(lambda x: (x**2).sum(), f64([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="not finite"):
        inverse_hessian(lambda x: (x**2).sum(-1).sqrt(), f64([[0.0, 0.0]]))  # ∇²‖x‖ blows up at 0


def test_the_preconditioned_sampler_by_name_needs_its_reference():
    """By name (samplers.registry), P is computed from a reference potential at given points;
    without them the set-up says what it needs. At the §5.1 centres P ≈ I (unit-variance components)."""
    from implicit_diffusion.models import hexagon_mixture
    from implicit_diffusion.samplers.registry import sampler_setup

    with pytest.raises(ValueError, match="needs a reference potential and reference_points"):
        sampler_setup("preconditioned", 0.2)
    V0 = hexagon_mixture(dtype=torch.float64)
    setup = sampler_setup("preconditioned", 0.2, reference=V0, reference_points=V0.means)
    assert setup.step_size == 0.2 and setup.shift == 0.0
    P = setup.step.preconditioner
    assert torch.equal(P, inverse_hessian(V0, V0.means, min_eigenvalue=0.5))
    assert 0 < float((P - torch.eye(2, dtype=torch.float64)).abs().max()) < 0.05  # ≈ I, not exactly I
