"""The ``rates`` experiment: exact ∇ℓ vs the library's Γ_R, the slope fitter, the step rules, θ_K → θ*,
the run directory and config validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import Z, assert_close64

from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import rates
from implicit_diffusion.metrics import fit_loglog_slope, running_average, tail_average
from implicit_diffusion.models import GaussianPotential
from implicit_diffusion.models.gaussian_reward import GaussianRewardProblem
from implicit_diffusion.objectives import RewardEstimator
from implicit_diffusion.runtime import runner

QUADRATIC = GaussianRewardProblem("quadratic", (2.0, 1.0), (1.0, 0.3), 1.0, 1.5)
BUMP = GaussianRewardProblem("bump", (1.0, -0.5), (1.0, 1.0), 0.8, 1.5)


def _gamma_draws(problem, theta, estimator, generator, *, batches: int, particles: int) -> torch.Tensor:
    """Γ(p, θ) of the library (estimator → surrogate → closed-form ∇θV) on ``batches`` independent
    batches of ``particles`` i.i.d. draws from π*(θ) = N(θ, σ²I); shape ``(batches, d)``."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    potential = GaussianPotential(theta, variance=problem.variance)
    out = torch.empty(batches, len(theta), dtype=torch.float64)
    for b in range(batches):
        x = theta + math.sqrt(problem.variance) * torch.randn(particles, len(theta), generator=generator,
                                                              dtype=torch.float64)
        potential.mean.grad = None
        estimator(potential, x).backward(potential)
        out[b] = potential.mean.grad
    return out


def _mean_matches(draws: torch.Tensor, expected: np.ndarray) -> bool:
    """Every component: |mean − expected| ≤ Z·sd/√n (sd estimated from the n = 2,000 i.i.d. batches)."""
    n = draws.shape[0]
    se = draws.std(0) / math.sqrt(n)
    return bool(((draws.mean(0) - torch.from_numpy(expected)).abs() <= Z * se).all())


@pytest.mark.parametrize("problem", [QUADRATIC, BUMP], ids=["quadratic", "bump"])
def test_exact_gradient_is_the_expectation_of_the_library_gamma(problem, generator):
    """E[Γ_R(p, θ)] = ∇ℓ(θ) for p = N particles i.i.d. from π*(θ) (the unbiased sample covariance).

    2,000 independent batches of 16 particles; tolerance Z = 5 standard errors of the mean of the
    2,000 batch values, per component. Negative control: the estimator with the opposite sign
    (λ = −1, i.e. ∇ of +E[R]) must fail the same check."""
    theta = np.array([0.3, 0.4])
    expected = problem.grad(theta)
    assert np.abs(expected).min() > 0.05  # a point where the sign matters in every component
    draws = _gamma_draws(problem, theta, RewardEstimator(problem.reward_fn), generator, batches=2000, particles=16)
    assert _mean_matches(draws, expected)
    flipped = _gamma_draws(problem, theta, RewardEstimator(problem.reward_fn, weight=-1.0), generator,
                           batches=2000, particles=16)
    assert not _mean_matches(flipped, expected)


@pytest.mark.parametrize("problem", [QUADRATIC, BUMP], ids=["quadratic", "bump"])
def test_exact_gradient_is_the_derivative_of_the_exact_loss(problem):
    """∇ℓ against central differences of ℓ (float64, h = 1e-5: truncation error O(h²) ≈ 1e-10)."""
    theta = np.array([0.3, 0.4])
    h = 1e-5
    fd = np.array([(problem.loss(theta + h * e) - problem.loss(theta - h * e)) / (2 * h) for e in np.eye(2)])
    np.testing.assert_allclose(problem.grad(theta), fd, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(problem.grad(problem.optimum), 0.0, atol=1e-15)


def test_quadratic_loss_is_minus_the_expected_reward():
    """ℓ(θ) = −E_{N(θ,σ²I)}[R] in closed form; checked against the Gaussian moments by hand."""
    theta = np.array([0.3, 0.4])
    a, t, s2 = np.array([1.0, 0.3]), np.array([2.0, 1.0]), 1.5
    assert QUADRATIC.loss(theta) == pytest.approx((a * ((theta - t) ** 2 + s2)).sum(), rel=1e-12)
    # bump: ∫ exp(−(x−t)²/2w²) N(x; θ, σ²) dx per dimension = √(w²/(w²+σ²)) exp(−(θ−t)²/2(w²+σ²))
    w2, tb = 0.64, np.array([1.0, -0.5])
    per_dim = np.sqrt(w2 / (w2 + s2)) * np.exp(-((theta - tb) ** 2) / (2 * (w2 + s2)))
    assert BUMP.loss(theta) == pytest.approx(-per_dim.prod(), rel=1e-12)


def test_slope_fitter_recovers_a_known_power_law_exactly():
    k = np.arange(1, 50001, dtype=np.float64)
    for p, c in ((-1 / 3, 2.0), (-0.5, 0.7), (-1.0, 13.0), (0.25, 1.0)):
        slope, intercept = fit_loglog_slope(k, c * k**p, 500.0)
        assert abs(slope - p) < 1e-10 and abs(intercept - math.log(c)) < 1e-9
    # on the continuous axis T = K h as well: the slope does not depend on the time unit
    slope, _ = fit_loglog_slope(0.05 * k, 4.0 * (0.05 * k) ** -0.5, 25.0)
    assert abs(slope + 0.5) < 1e-10
    # a power law with a different exponent before the fit range does not leak into the fit
    values = np.where(k < 1000, 50.0 * k**-1.0, 50.0 * 1000**-1.0 * (k / 1000) ** -0.2)
    assert abs(fit_loglog_slope(k, values, 1000.0)[0] + 0.2) < 1e-10
    with pytest.raises(ValueError, match="fewer than 2 points"):
        fit_loglog_slope(k[:1], k[:1], 1.0)


def test_running_and_tail_averages_exact():
    v = np.array([[8.0, 4.0, 2.0, 2.0, 1.0, 1.0]])
    np.testing.assert_allclose(running_average(v), [[8.0, 6.0, 14 / 3, 4.0, 3.4, 3.0]], rtol=1e-15)
    # B_K: mean over K/2 < k ≤ K, i.e. k = ⌊K/2⌋+1 … K (1-based)
    np.testing.assert_allclose(tail_average(v), [[8.0, 4.0, 3.0, 2.0, 5 / 3, 4 / 3]], rtol=1e-15)


@pytest.mark.parametrize("rule", rates.RULES)
def test_single_run_is_the_coupled_discrete_scheme(rule):
    """run_single against the update of the discrete analysis written by hand (float64, same noise):
    X_{k+1} = X_k − η_k(X_k − θ_k)/σ² + √(2η_k) B,  θ_{k+1} = θ_k − λ η_k ε_k Γ_R(X_k, θ_k)."""
    cfg = rates.Config(num_steps=7, num_particles=5, num_seeds=1, lr=0.7, variance=1.5, dt=0.3, progress=False)
    problem = rates.problem(cfg)
    eps = {"decreasing": lambda k: 1 / math.sqrt(k + 1), "constant": lambda k: 1.0,
           "continuous": lambda k: min(1.0, 1 / math.sqrt(k * cfg.dt)) if k else 1.0}[rule]
    eta = {"decreasing": lambda k: cfg.step_size / math.sqrt(k + 1), "constant": lambda k: cfg.constant_step,
           "continuous": lambda k: cfg.dt}[rule]
    g = torch.Generator().manual_seed(11)
    theta = torch.tensor(cfg.theta0, dtype=torch.float64)
    x = theta + math.sqrt(cfg.variance) * torch.randn(5, 2, generator=g, dtype=torch.float64)
    expected = [theta.clone()]
    for k in range(cfg.num_steps):
        r = problem.reward_fn(x)
        gamma = ((r - r.mean())[:, None] * (-(x - theta) / cfg.variance)).sum(0) / (len(r) - 1)
        x = x - eta(k) * (x - theta) / cfg.variance + math.sqrt(2 * eta(k)) * torch.randn(
            5, 2, generator=g, dtype=torch.float64)
        theta = theta - cfg.lr * eta(k) * eps(k) * gamma
        expected.append(theta.clone())
    got = rates.run_single(cfg, rule, 11)
    assert_close64(torch.from_numpy(got), torch.stack(expected))
    assert np.abs(got[-1] - got[0]).max() > 0.1  # θ moved


def _final_thetas(cfg: rates.Config, seeds: range, estimator=None) -> np.ndarray:
    return np.stack([rates.run_single(cfg, "decreasing", s, estimator=estimator)[-1] for s in seeds])


@pytest.mark.slow
def test_theta_K_approaches_the_exact_optimum(seed):
    """θ_K of the decreasing rule is centred on θ*: over 16 independent seeds, per component,
    |mean θ_K − θ*| ≤ Z·sd/√16 (sd estimated from the 16 runs; a t-test with 15 degrees of freedom,
    false-failure rate ≈ 2e-4 per component at Z = 5), and the runs have come close:
    mean ‖θ_K − θ*‖ below a tenth of ‖θ₀ − θ*‖.
    Negative control: Γ_R of a reward whose target is off by 0.4 in the first coordinate (a biased
    estimator) must fail the centring check."""
    cfg = rates.Config(target=(1.0, -1.0), curvatures=(1.0, 0.6), num_particles=64, num_steps=1500, progress=False)
    problem = rates.problem(cfg)
    seeds = range(100 * seed, 100 * seed + 16)

    def centred(final: np.ndarray) -> bool:
        se = final.std(0, ddof=1) / math.sqrt(len(final))
        return bool((np.abs(final.mean(0) - problem.optimum) <= Z * se).all())

    final = _final_thetas(cfg, seeds)
    assert centred(final)
    dist = np.linalg.norm(final - problem.optimum, axis=-1).mean()
    assert dist < 0.1 * np.linalg.norm(np.array(cfg.theta0) - problem.optimum)
    wrong = rates.problem(rates.Config(target=(1.4, -1.0), curvatures=(1.0, 0.6)))
    biased = _final_thetas(cfg, seeds, estimator=RewardEstimator(wrong.reward_fn))
    assert not centred(biased)


def test_tiny_config_runs_through_execute_and_writes_its_files(tmp_path):
    cfg = rates.Config(num_steps=400, num_particles=32, num_seeds=2, progress=False)
    result, files = runner.execute(rates, cfg, tmp_path / "run")
    # the runner's own files (config, metrics, …) and then the experiment's
    assert {"config.toml", "metrics.jsonl"} <= set(files)
    assert files[-3:] == ["summary.json", "rates.png", "theta.png"]
    for name in files:
        assert (tmp_path / "run" / name).stat().st_size > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["rules"]) == set(rates.RULES)
    for rule in rates.RULES:
        entry = summary["rules"][rule]
        assert len(entry["average"]["slope_per_seed"]) == 2 and len(entry["tail"]["slope_per_seed"]) == 2
        assert entry["theory_exponent"] == rates.THEORY_EXPONENTS[rule]
        assert result.thetas[rule].shape == (2, 401, 2) and result.grad_sq[rule].shape == (2, 400)
    # A_K decreases over the run for the decreasing rule (the gradient starts at ‖2a(θ₀ − t)‖² ≈ 16)
    avg = result.curve("decreasing")
    assert (avg[:, -1] < 0.1 * result.grad_sq["decreasing"][:, :10].max(1)).all()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["rule"] for r in records} == set(rates.RULES)
    text = rates.table(result)
    assert all(rule in text for rule in rates.RULES)


def test_same_seed_same_run():
    cfg = rates.Config(num_steps=50, num_particles=8, num_seeds=1, rules=("decreasing",), progress=False)
    a, b = rates.run(cfg), rates.run(cfg)
    assert np.array_equal(a.thetas["decreasing"], b.thetas["decreasing"])
    c = rates.run(rates.Config(**{**cfg.__dict__, "seed": 1}))
    assert not np.array_equal(a.thetas["decreasing"], c.thetas["decreasing"])


@pytest.mark.parametrize("key, value", [
    ("num_particles", 1), ("num_steps", 0), ("step_size", -0.1), ("step_size", 2.5), ("dt", 2.0),
    ("constant_step", 0.0), ("lr", 0.0), ("num_seeds", 0), ("variance", 0.0), ("fit_from", 1.0),
    ("fit_from", 0.0), ("rules", ("decreasing", "adam")), ("rules", ()), ("theta0", (0.0,)),
    ("curvatures", (1.0, 0.0)), ("curvatures", (1.0,)), ("num_threads", -1), ("bump_width", 0.0),
])
def test_bad_config_values_raise_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=repr(key) if key != "rules" else "'rules'"):
        rates.Config(**{key: value})


def test_config_round_trips_through_toml(tmp_path):
    from implicit_diffusion.runtime.config import build_config, config_to_toml, load_config_file

    cfg = rates.Config(rules=("decreasing", "continuous"), target=(1.0, 2.0, 3.0), theta0=(0.0, 0.0, 0.0),
                       curvatures=(1.0, 0.5, 0.1), reward="bump")
    (tmp_path / "c.toml").write_text(config_to_toml(cfg))
    assert build_config(rates.Config, load_config_file(tmp_path / "c.toml")) == cfg
    with pytest.raises(ConfigError, match="'reward'"):
        build_config(rates.Config, {"reward": "cubic"})
