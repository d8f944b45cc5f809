"""MALA step: the exact Metropolis-Hastings ratio, unbiased stationary law on a Gaussian where
ULA is visibly biased (negative control), acceptance behaviour, errors, RNG discipline and
use inside SingleLoop."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close64, assert_single_loop_matches_hand_loop, f64, mean_within, randn64, var_within

from implicit_diffusion.algorithms import SingleLoop
from implicit_diffusion.models import GaussianPotential, hexagon_mixture
from implicit_diffusion.objectives import RewardEstimator, hexagon_reward
from implicit_diffusion.samplers import LangevinInfo, energy_grad, mala_step, ula_step


def plain_quartic(x):
    """A plain callable V(x) (no module, no grad_x; non-Gaussian): Σ (x⁴/4 + x²/2 − x)."""
    return (x**4 / 4 + x**2 / 2 - x).sum(-1)


POTENTIALS = {
    "gaussian": lambda: GaussianPotential(f64([0.5, -1.0]), 0.7),
    "mixture": lambda: hexagon_mixture(dtype=torch.float64),
    "plain-callable": lambda: plain_quartic,
}


def reference_log_ratio(x, z, V, gamma):
    """log of the MH ratio π(y)q(x|y) / (π(x)q(y|x)), from Normal densities (constants included)."""
    y = x - gamma * energy_grad(V, x) + math.sqrt(2 * gamma) * z
    scale = math.sqrt(2 * gamma)
    log_q_fwd = torch.distributions.Normal(x - gamma * energy_grad(V, x), scale).log_prob(y).sum(-1)
    log_q_bwd = torch.distributions.Normal(y - gamma * energy_grad(V, y), scale).log_prob(x).sum(-1)
    return y, -V(y) + V(x) + log_q_bwd - log_q_fwd


# ---------------------------------------------------------------------------------------------
# Exact: the accept/reject decision with fixed randomness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(POTENTIALS))
def test_acceptance_threshold_exact(name, generator):
    """Accept iff u ≤ α: u just below α accepts y, u just above keeps x; rate = mean min(1, α)."""
    V, gamma = POTENTIALS[name](), 0.3
    x, z = randn64(generator, 64, 2), randn64(generator, 64, 2)
    y, log_ratio = reference_log_ratio(x, z, V, gamma)
    alpha = log_ratio.clamp(max=0).exp()
    assert ((alpha > 0.01) & (alpha < 0.99)).any(), "the check needs some proposals with 0 < α < 1"
    # Wild proposals of the quartic have α below float64's range (α = 0): u = 1e-300 rejects them.
    below, info = mala_step(x, V, step_size=gamma, noise=z, uniform=(alpha * (1 - 1e-9)).clamp(min=1e-300))
    above, _ = mala_step(x, V, step_size=gamma, noise=z, uniform=(alpha * (1 + 1e-9)).clamp(1e-300, 1.0))
    assert_close64(below, torch.where((alpha > 0).unsqueeze(-1), y, x))
    expected_above = torch.where((alpha >= 1.0).unsqueeze(-1), y, x)  # α = 1 accepts even u = 1
    assert_close64(above, expected_above)
    assert isinstance(info, LangevinInfo) and info.acceptance_rate.shape == ()
    assert_close64(info.acceptance_rate, alpha.mean())


def test_uniform_zero_is_ula_and_differentiable():
    """u = 0 accepts every proposal, so MALA's x_next is the ULA step; with grad mode on it
    stays differentiable w.r.t. θ (the selected proposal carries the graph)."""
    V = GaussianPotential(f64([0.5, -1.0]), 0.7)
    x = f64([[1.0, 2.0], [-3.0, 0.5], [0.0, 0.0]])
    z = f64([[0.3, -1.2], [2.0, 0.1], [-0.7, 0.4]])
    x_mala, _ = mala_step(x, V, step_size=0.2, noise=z, uniform=torch.zeros(3, dtype=torch.float64))
    x_ula, _ = ula_step(x, V, step_size=0.2, noise=z)
    assert_close64(x_mala, x_ula)
    x_mala.sum().backward()
    # ∂/∂μ Σᵢ γ(μ − xᵢ)/σ² = 3γ/σ² per coordinate
    assert_close64(V.mean.grad, torch.full((2,), 3 * 0.2 / 0.7, dtype=torch.float64))


def test_zero_noise_step_toward_mode_accepted_even_with_u_one():
    """Gaussian, z = 0: y = μ + a(x − μ), a = 1 − γ/σ², and
    log α = (1 − a²)(1 − a)‖x − μ‖²/(4σ²) > 0, so the move toward lower energy is accepted
    even with u = 1; at the mode, y = x."""
    mu, var, gamma = f64([0.5, -1.0]), 0.7, 0.3
    V = GaussianPotential(mu, var)
    x = torch.cat([mu[None], f64([[2.0, 1.0], [-4.0, 3.0]])])
    zeros, ones = torch.zeros_like(x), torch.ones(3, dtype=torch.float64)
    x1, info = mala_step(x, V, step_size=gamma, noise=zeros, uniform=ones)
    assert_close64(x1, mu + (1 - gamma / var) * (x - mu))
    assert_close64(info.acceptance_rate, f64(1.0))


def test_rejected_particles_unchanged_and_input_not_mutated():
    """A huge step overshoots far past the mode (α ≈ 0): with u = 0.5 the particle stays put."""
    V = GaussianPotential(f64([0.0]), 1.0)
    x = f64([[3.0], [-2.0]])
    x_before = x.clone()
    x1, info = mala_step(x, V, step_size=50.0, noise=torch.zeros_like(x), uniform=f64([0.5, 0.5]))
    assert_close64(x1, x_before)
    assert_close64(x, x_before)
    assert float(info.acceptance_rate) < 1e-10


# ---------------------------------------------------------------------------------------------
# Statistical: MALA is unbiased where ULA is not (negative control)
# ---------------------------------------------------------------------------------------------

MU, VAR, GAMMA = 1.5, 0.8, 0.5
N_CHAINS, BURN_IN = 20_000, 300


def final_states(step, generator):
    """One sample per chain after BURN_IN steps on N(MU, VAR), from N(MU + 3, 0.1²): i.i.d. across chains."""
    V = GaussianPotential(f64([MU]), VAR)
    x = MU + 3.0 + 0.1 * randn64(generator, N_CHAINS, 1)
    with torch.no_grad():
        for _ in range(BURN_IN):
            x, _ = step(x, V, step_size=GAMMA, generator=generator)
    return x[:, 0]


def test_mala_stationary_law_exact_where_ula_is_biased(generator):
    """Target N(μ, σ²), γ = 0.5, σ² = 0.8. ULA is AR(1), x⁺ − μ = a(x − μ) + √(2γ)n, a = 1 − γ/σ²,
    so its stationary variance is 2γ/(1 − a²) = σ²/(1 − γ/(2σ²)) = 1.1636 (+45% bias). With
    n = 20,000 i.i.d. final states, SE(s²) = σ²√(2/(n − 1)) = 0.0080 and the tolerance is
    Z = 5 SEs (0.040): MALA's s² must be within it of σ² = 0.8; ULA's must be outside it, and
    within 5 SEs of its own formula (the negative control shows the check has power).
    After 300 steps the initial offset has decayed below 1e-12 for both chains (|a| = 0.375;
    MALA accepts ≈ 90% here)."""
    x_mala = final_states(mala_step, generator)
    x_ula = final_states(ula_step, generator)
    ula_var = VAR / (1 - GAMMA / (2 * VAR))
    assert var_within(x_mala, VAR), f"MALA variance {float(x_mala.var()):.4f}, target {VAR}"
    assert not var_within(x_ula, VAR), f"ULA variance {float(x_ula.var()):.4f} not distinguishable from {VAR}"
    assert var_within(x_ula, ula_var), f"ULA variance {float(x_ula.var()):.4f}, formula {ula_var:.4f}"


def test_mala_stationary_mean(generator):
    """|mean − μ| ≤ Z·σ/√n over n = 20,000 i.i.d. final states (tolerance 0.032)."""
    x_mala = final_states(mala_step, generator)
    assert mean_within(x_mala, MU, math.sqrt(VAR)), f"MALA mean {float(x_mala.mean()):.4f}, target {MU}"


def mala_step_flipped_drift(x, potential, *, step_size, generator):
    """A wrong MALA (negative control): the proposal's drift with the wrong sign,
    y = x + γ∇V(x) + √(2γ)z, the MH ratio left as MALA's (log q(y|x) = −‖z‖²/2,
    log q(x|y) = −‖x − y + γ∇V(y)‖²/(4γ)), so it no longer targets π."""
    z = randn64(generator, *x.shape)
    u = torch.rand(x.shape[:1], generator=generator, dtype=x.dtype)
    y = x + step_size * energy_grad(potential, x) + math.sqrt(2 * step_size) * z
    log_q_bwd = -((x - y + step_size * energy_grad(potential, y)) ** 2).sum(-1) / (4 * step_size)
    log_ratio = potential(x) - potential(y) + log_q_bwd + 0.5 * (z**2).sum(-1)
    return torch.where((torch.log(u) <= log_ratio).unsqueeze(-1), y, x), None


def test_mala_stationary_mean_check_fails_for_a_wrong_mala(generator):
    """Negative control of test_mala_stationary_mean: the same mean_within check (n = 20,000,
    tolerance 0.032) on the flipped-drift MALA above must fail (its final states have mean
    2.82–2.86 and variance ≈ 7.2 over seeds 0–4, not μ = 1.5, σ² = 0.8). On this symmetric
    Gaussian target a wrong variant that keeps the symmetry about μ (ULA, a flipped
    Hastings-correction sign, noise √γ) keeps the mean, and is caught by the variance check
    instead (test_mala_stationary_law_exact_where_ula_is_biased)."""
    x_wrong = final_states(mala_step_flipped_drift, generator)
    assert torch.isfinite(x_wrong).all()
    assert not mean_within(x_wrong, MU, math.sqrt(VAR)), f"wrong MALA mean {float(x_wrong.mean()):.4f} passes"


def test_acceptance_rate_tiny_vs_large_step(generator):
    """At stationarity on N(0, 1) in 2-D: a tiny step accepts almost everything (rejection is
    O(γ^{3/2})); a step near ULA's stability limit accepts visibly less, but not nothing."""
    V = GaussianPotential(torch.zeros(2, dtype=torch.float64), 1.0)
    x = randn64(generator, 4000, 2)
    _, small = mala_step(x, V, step_size=1e-3, generator=generator)
    _, large = mala_step(x, V, step_size=1.8, generator=generator)
    assert float(small.acceptance_rate) > 0.999
    assert 0.05 < float(large.acceptance_rate) < 0.9
    assert float(large.acceptance_rate) < float(small.acceptance_rate)


# ---------------------------------------------------------------------------------------------
# Errors, reproducibility, algorithms
# ---------------------------------------------------------------------------------------------


def test_errors_name_what_to_pass():
    V = GaussianPotential(f64([0.0, 0.0]))
    x = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="generator="):
        mala_step(x, V, step_size=0.1)
    with pytest.raises(ValueError, match="uniform="):
        mala_step(x, V, step_size=0.1, noise=torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"uniform must have shape \(4,\)"):
        mala_step(x, V, step_size=0.1, noise=torch.zeros_like(x), uniform=torch.zeros(4, 1))
    with pytest.raises(ValueError, match="step_size must be > 0"):
        mala_step(x, V, step_size=0.0, generator=torch.Generator())


def test_same_seed_same_trajectory(seed):
    V = hexagon_mixture(dtype=torch.float64)

    def trajectory(s):
        g = torch.Generator().manual_seed(s)
        x = randn64(g, 100, 2)
        out = []
        for _ in range(20):
            x, _ = mala_step(x, V, step_size=0.5, generator=g)
            out.append(x)
        return torch.stack(out)

    assert torch.equal(trajectory(seed), trajectory(seed))
    assert not torch.equal(trajectory(seed), trajectory(seed + 1))


def test_runs_inside_single_loop_unchanged(generator):
    """SingleLoop(sampler=mala_step) on the §5.1 hexagon: its particles are exactly those of a
    hand-written loop of MALA steps with the same θ updates, without autograd history."""
    assert_single_loop_matches_hand_loop(hexagon_mixture(dtype=torch.float64), RewardEstimator(hexagon_reward),
                                         mala_step, randn64(generator, 300, 2), step_size=0.2)


def test_the_loops_report_malas_acceptance_rate_and_not_ulas():
    """SingleLoop and NestedLoop pass the sampler's acceptance rate into their per-step stats."""
    from implicit_diffusion.algorithms import NestedLoop

    def stats_of(cls, sampler, **kw):
        V = GaussianPotential(torch.zeros(2))
        algo = cls(V, RewardEstimator(lambda x: -x[:, 0] ** 2), torch.optim.SGD(V.parameters(), lr=0.01),
                   step_size=0.5, sampler=sampler, **kw)
        g = torch.Generator().manual_seed(0)
        seen = []
        algo.run(torch.randn(100, 2, generator=g), 3, generator=g, callbacks=[lambda k, x, s: seen.append(s)])
        return seen

    nested = {"num_inner_steps": 2, "init_fn": lambda g: torch.randn(100, 2, generator=g)}
    for cls, kw in ((SingleLoop, {}), (NestedLoop, nested)):
        rates = [s["acceptance_rate"] for s in stats_of(cls, mala_step, **kw)]
        assert len(rates) == 3 and all(0 < float(r) < 1 for r in rates)
        assert all("acceptance_rate" not in s for s in stats_of(cls, ula_step, **kw))
