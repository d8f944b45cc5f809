"""ULA step: exact update with fixed noise, the exact AR(1) law on Gaussian targets (with a
negative control), the ULA bias, RNG discipline, invariants and differentiability."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z, assert_close64, energy_mlp64, f64, mean_within, randn64, var_within

from implicit_diffusion.models import GaussianMixture, GaussianPotential, as_potential, hexagon_mixture
from implicit_diffusion.samplers import LangevinInfo, energy_grad, ula_step


def plain_quadratic(x):
    """A plain callable V(x) (no module, no grad_x): ‖x − c‖²/2 with c = (1, −1)."""
    return ((x - f64([1.0, -1.0])) ** 2).sum(-1) / 2


# ---------------------------------------------------------------------------------------------
# Exact: the update with fixed noise
# ---------------------------------------------------------------------------------------------

POTENTIALS = {
    "gaussian": lambda: GaussianPotential(f64([0.5, -1.0]), 0.7),
    "mixture": lambda: hexagon_mixture(dtype=torch.float64),
    "mixture-diff-var": lambda: GaussianMixture(f64([[0.0, 0.0], [2.0, 1.0]]), f64([0.5, 2.0]), f64([0.2, -0.3])),
    "energy-mlp": energy_mlp64,
    "function": lambda: as_potential(lambda x, t: ((x - t) ** 2).sum(-1) / 2 + torch.cos(x).sum(-1), f64([1.0, 2.0])),
    "plain-callable": lambda: plain_quadratic,
}


def autograd_grad(V, x):
    xr = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(V(xr).sum(), xr)[0]


@pytest.mark.parametrize("name", list(POTENTIALS))
@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
def test_ula_step_exact_with_fixed_noise(name, grad_mode, generator):
    V = POTENTIALS[name]()
    x = randn64(generator, 9, 2) * 2
    n = randn64(generator, 9, 2)
    gamma = 0.13
    expected = x - gamma * autograd_grad(V, x) + math.sqrt(2 * gamma) * n
    with torch.set_grad_enabled(grad_mode):
        x1, info = ula_step(x, V, step_size=gamma, noise=n)
    assert_close64(x1.detach(), expected)
    assert isinstance(info, LangevinInfo) and info.acceptance_rate is None


@pytest.mark.parametrize("name", ["gaussian", "mixture", "mixture-diff-var", "energy-mlp"])
def test_ula_step_exact_dimension_major_particles(name, generator):
    """Particles stored dimension-major (x = y.t() with y of shape (d, N)): same update, exact."""
    V = POTENTIALS[name]()
    x = (randn64(generator, 2, 9) * 2).t()
    assert x.stride() == (1, 9)
    n = randn64(generator, 9, 2)
    expected = x - 0.13 * autograd_grad(V, x) + math.sqrt(2 * 0.13) * n
    with torch.no_grad():
        x1, _ = ula_step(x, V, step_size=0.13, noise=n)
        x2, _ = ula_step(x, V, step_size=0.13, generator=generator)
    assert x1.shape == x2.shape == x.shape
    assert_close64(x1, expected)


def test_energy_grad_plain_callable(generator):
    x = randn64(generator, 5, 2)
    with torch.no_grad():
        g = energy_grad(plain_quadratic, x)
    assert_close64(g, x - f64([1.0, -1.0]))
    assert not g.requires_grad


def test_ula_step_doc_example():
    """Regression guard beside the exact test: the docstring's golden numbers (float32)."""
    V = GaussianPotential(torch.zeros(2))
    x1, _ = ula_step(torch.ones(3, 2), V, step_size=0.1, noise=torch.zeros(3, 2))
    assert torch.equal(x1, torch.full((3, 2), 0.9))


# ---------------------------------------------------------------------------------------------
# Statistical: the exact AR(1) law on N(μ, σ²)
# ---------------------------------------------------------------------------------------------


def wrong_ula_step(x, potential, *, step_size, generator=None, noise=None):
    """Negative control: noise scaled √γ instead of √(2γ) (targets the wrong temperature)."""
    n = torch.randn(x.shape, generator=generator, dtype=x.dtype) if noise is None else noise
    return x - step_size * energy_grad(potential, x) + math.sqrt(step_size) * n, LangevinInfo()


def ar1_law(mu, var, gamma, k, m0, v0):
    """Law of ULA on N(μ, σ²) after k steps from N(m0, v0): (mean, variance) (paper-notes §6)."""
    a = 1 - gamma / var
    mean = a**k * m0 + (1 - a**k) * mu
    variance = a ** (2 * k) * v0 + 2 * gamma * (1 - a ** (2 * k)) / (1 - a**2)
    return mean, variance


def run_chains(step, V, x0, gamma, k, generator):
    x = x0
    with torch.no_grad():
        for _ in range(k):
            x, _ = step(x, V, step_size=gamma, generator=generator)
    return x


def matches_law(x, means, variances, z=Z) -> bool:
    """Every coordinate: mean within z·σ/√n and variance within z·σ²√(2/(n−1)) of the exact law.
    The chains are independent and the law after k steps is exactly Gaussian (affine steps, Gaussian
    start), so these are i.i.d. Gaussian draws."""
    ok = True
    for j in range(x.shape[1]):
        ok &= mean_within(x[:, j], means[j], math.sqrt(variances[j]), z)
        ok &= var_within(x[:, j], variances[j], z)
    return ok


N_CHAINS = 20_000


@pytest.mark.parametrize("step", [ula_step, wrong_ula_step], ids=["ula", "negative-control"])
def test_ula_ar1_law_1d(step, generator):
    """20,000 independent chains, k = 10 steps, μ = 1.5, σ² = 2, γ = 0.3 (a = 0.85), from N(−2, 0.5).
    Exact law N(0.81, 2.08). Tolerances: mean 5·σ_k/√n ≈ 0.051, variance 5·σ_k²√(2/(n−1)) ≈ 0.104.
    Negative control (noise √γ): variance 1.06, off by 1.02 ≈ 49 SE: the same check must fail."""
    mu, var, gamma, k, m0, v0 = 1.5, 2.0, 0.3, 10, -2.0, 0.5
    V = GaussianPotential(f64([mu]), var)
    x0 = m0 + math.sqrt(v0) * randn64(generator, N_CHAINS, 1)
    x = run_chains(step, V, x0, gamma, k, generator)
    mean, variance = ar1_law(mu, var, gamma, k, m0, v0)
    assert matches_law(x, [mean], [variance]) == (step is ula_step)


@pytest.mark.parametrize("step", [ula_step, wrong_ula_step], ids=["ula", "negative-control"])
def test_ula_ar1_law_2d(step, generator):
    """2-D N(μ, σ²I), μ = (1, −2), σ² = 0.5, γ = 0.1 (a = 0.8), k = 8 steps from N((3, 0), 0.2 I);
    20,000 chains; per coordinate the tolerances of the 1-D test (z = 5), and the sample correlation
    of the two coordinates within 5/√n ≈ 0.035 of 0. Negative control (noise √γ): stationary part of
    the variance halved (0.44 vs 0.25), ≈ 60 SE off."""
    mu, var, gamma, k = f64([1.0, -2.0]), 0.5, 0.1, 8
    m0, v0 = f64([3.0, 0.0]), 0.2
    V = GaussianPotential(mu, var)
    x0 = m0 + math.sqrt(v0) * randn64(generator, N_CHAINS, 2)
    x = run_chains(step, V, x0, gamma, k, generator)
    laws = [ar1_law(float(mu[j]), var, gamma, k, float(m0[j]), v0) for j in range(2)]
    ok = matches_law(x, [m for m, _ in laws], [v for _, v in laws])
    assert ok == (step is ula_step)
    corr = torch.corrcoef(x.T)[0, 1]
    assert abs(float(corr)) <= Z / math.sqrt(N_CHAINS)


def test_ula_stationary_variance_shows_the_ula_bias(generator):
    """Large step γ = σ²/2 (a = 0.5): after 40 steps (a^80 ≈ 1e-24, start forgotten) the variance is
    the ULA stationary σ²/(1 − γ/(2σ²)) = 4σ²/3, not σ². With n = 20,000 chains the SE of the
    variance is ≈ 1.3% of σ² while the bias is 33% of σ²: within 5 SE of 4σ²/3, not within 5 SE of σ².
    The mean stays unbiased (within 5 SE of μ)."""
    mu, var = -0.5, 1.5
    gamma = var / 2
    V = GaussianPotential(f64([mu]), var)
    x0 = randn64(generator, N_CHAINS, 1)
    x = run_chains(ula_step, V, x0, gamma, 40, generator)[:, 0]
    stationary = var / (1 - gamma / (2 * var))
    assert stationary == pytest.approx(4 * var / 3)
    assert var_within(x, stationary)
    assert not var_within(x, var)
    assert mean_within(x, mu, math.sqrt(stationary))


# ---------------------------------------------------------------------------------------------
# RNG discipline and invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gaussian", "mixture", "energy-mlp", "plain-callable"])
def test_ula_never_touches_global_rng(name, generator):
    V = POTENTIALS[name]()
    x = randn64(generator, 6, 2)
    state = torch.get_rng_state()
    with torch.no_grad():
        ula_step(x, V, step_size=0.1, generator=generator)
    ula_step(x, V, step_size=0.1, generator=generator)
    ula_step(x, V, step_size=0.1, noise=torch.zeros_like(x))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", ["gaussian", "mixture", "energy-mlp"])
def test_ula_same_seed_bit_identical(name):
    V = POTENTIALS[name]()
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(42)
        x = torch.randn(50, 2, generator=g, dtype=torch.float64)
        with torch.no_grad():
            for _ in range(5):
                x, _ = ula_step(x, V, step_size=0.1, generator=g)
        outs.append(x)
    assert torch.equal(outs[0], outs[1])
    g = torch.Generator().manual_seed(43)  # and a different seed gives a different output
    x = torch.randn(50, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.equal(ula_step(x, V, step_size=0.1, generator=g)[0], outs[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", ["gaussian", "mixture", "energy-mlp", "plain-callable"])
def test_ula_preserves_input_shape_dtype(name, dtype, grad_mode, generator):
    V = POTENTIALS[name]()
    if isinstance(V, torch.nn.Module):
        V = V.to(dtype)
        fn = V
    else:
        def fn(x):
            return plain_quadratic(x.double()).to(x.dtype)
    x = torch.randn(7, 2, generator=generator, dtype=dtype)
    noise = torch.randn(7, 2, generator=generator, dtype=dtype)
    x_copy, noise_copy = x.clone(), noise.clone()
    with torch.set_grad_enabled(grad_mode):
        x1, _ = ula_step(x, fn, step_size=0.2, noise=noise)
        x2, _ = ula_step(x, fn, step_size=0.2, generator=generator)
    for out in (x1, x2):
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.equal(x, x_copy) and torch.equal(noise, noise_copy)
    assert x1 is not x
    if not grad_mode:
        assert not x1.requires_grad and x1.grad_fn is None


def test_ula_no_grad_touches_no_parameter_grad(generator):
    V = energy_mlp64()
    with torch.no_grad():
        x1, _ = ula_step(randn64(generator, 5, 2), V, step_size=0.1, generator=generator)
    assert not x1.requires_grad
    assert all(p.grad is None for p in V.parameters())


def test_ula_gradient_wrt_theta_and_x_gaussian_closed_form(generator):
    """x₁ = x − γ(x − μ)/σ² + √(2γ)n ⇒ ∂x₁/∂μ = (γ/σ²) I and ∂x₁/∂x = (1 − γ/σ²) I per particle:
    for L = Σ x₁, ∇μL = N·γ/σ² (each coordinate) and ∇ₓL = 1 − γ/σ² (each entry). Exact, float64."""
    N, gamma, var = 6, 0.2, 0.8
    V = GaussianPotential(f64([0.3, -0.4, 1.0]), var)
    x = randn64(generator, N, 3).requires_grad_(True)
    x1, _ = ula_step(x, V, step_size=gamma, noise=randn64(generator, N, 3))
    gmu, gx = torch.autograd.grad(x1.sum(), [V.mean, x])
    assert_close64(gmu, torch.full((3,), N * gamma / var, dtype=torch.float64))
    assert_close64(gx, torch.full((N, 3), 1 - gamma / var, dtype=torch.float64))


@pytest.mark.parametrize("name", ["mixture", "energy-mlp", "function"])
def test_ula_gradient_wrt_theta_matches_finite_differences(name, generator):
    """Noise fixed: ∇θ of ⟨u, ula_step(x, θ)⟩ by autograd vs central differences (h = 1e-5, float64;
    the error is O(h²) ≈ 1e-10 times third derivatives, tolerance 1e-6 relative)."""
    V = POTENTIALS[name]()
    x = randn64(generator, 5, 2)
    n = randn64(generator, 5, 2)
    u = randn64(generator, 5, 2)
    gamma = 0.15

    def objective():
        return (ula_step(x, V, step_size=gamma, noise=n)[0] * u).sum()

    params = list(V.parameters())
    # allow_unused: the last layer's bias of the MLP does not enter ∇ₓV (its gradient is 0)
    grads = torch.autograd.grad(objective(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    h = 1e-5
    with torch.no_grad():
        for p, g in zip(params, grads):
            fd = torch.zeros_like(p)
            flat, fdf = p.view(-1), fd.view(-1)
            for i in range(flat.numel()):
                old = float(flat[i])
                flat[i] = old + h
                plus = float(objective())
                flat[i] = old - h
                minus = float(objective())
                flat[i] = old
                fdf[i] = (plus - minus) / (2 * h)
            torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)


def test_ula_gradient_wrt_x_plain_callable(generator):
    """Plain callable V(x) = ‖x − c‖²/2: x₁ = x − γ(x − c) + √(2γ)n, so ∇ₓΣx₁ = 1 − γ (exact)."""
    x = randn64(generator, 4, 2).requires_grad_(True)
    x1, _ = ula_step(x, plain_quadratic, step_size=0.25, noise=randn64(generator, 4, 2))
    (gx,) = torch.autograd.grad(x1.sum(), x)
    assert_close64(gx, torch.full((4, 2), 0.75, dtype=torch.float64))


def test_ula_errors(generator):
    V = GaussianPotential(torch.zeros(2))
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"noise must have the particles' shape \(3, 2\), got \(3, 1\)"):
        ula_step(x, V, step_size=0.1, noise=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="noise must have the particles' shape"):
        ula_step(x, V, step_size=0.1, noise=torch.zeros(2, 3))
    for bad in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="step_size must be > 0"):
            ula_step(x, V, step_size=bad, generator=generator)


def test_ula_refuses_to_draw_from_the_global_rng():
    """Without a generator or pre-drawn noise a step would need the global RNG: it is an error."""
    from implicit_diffusion.models import GaussianPotential

    with pytest.raises(ValueError, match="generator=torch.Generator"):
        ula_step(torch.zeros(3, 2), GaussianPotential(torch.zeros(2)), step_size=0.1)
