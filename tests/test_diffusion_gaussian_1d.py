"""The 1-D Gaussian diffusion experiment: its exact law and a tiny end-to-end run."""

import math

import numpy as np
import torch

from implicit_diffusion.experiments.diffusion_gaussian_1d import Config, GaussianScore, linear_law, run
from implicit_diffusion.samplers.diffusion import euler_maruyama_step, sample
from implicit_diffusion.samplers.schedules import VPSchedule


def test_linear_law_converges_to_the_continuous_one():
    """Euler–Maruyama is first order: the gap to c = 1 − e^{−2T} (and v = 1) halves with M."""
    T = 1.0
    gaps = []
    for m in (50, 100, 200):
        c, v = linear_law(VPSchedule("ou", num_steps=m, T=T, t_min=0.0))
        gaps.append((abs(c - (1 - math.exp(-2 * T))), abs(v - 1)))
    for (c1, v1), (c2, v2) in zip(gaps, gaps[1:]):
        assert 0.4 < c2 / c1 < 0.6 and 0.4 < v2 / v1 < 0.6


MC_THETA, MC_N = 1.3, 200_000


def monte_carlo_x_m(step=euler_maruyama_step, model=None):
    """200k draws of x_M (M = 10, T = 1) from x₀ ~ N(0, 1) at θ = 1.3, seed 0; the schedule."""
    sched = VPSchedule("ou", num_steps=10, T=1.0, t_min=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = sample(step, model or GaussianScore(MC_THETA), torch.randn(MC_N, 1, generator=g, dtype=torch.float64),
                   schedule=sched, generator=g)[:, 0]
    return x, sched


def law_checks(x, sched):
    """(mean within 5 SE of cθ, variance within 5 SE of v) for x_M ~ N(cθ, v) = linear_law."""
    c, v = linear_law(sched)
    n = x.numel()
    return (abs(x.mean().item() - MC_THETA * c) < 5 * math.sqrt(v / n),
            abs(x.var().item() - v) < 5 * v * math.sqrt(2 / (n - 1)))


def test_linear_law_matches_monte_carlo():
    """200k samples of x_M at θ = 1.3: mean cθ and variance v within 5 SE."""
    assert law_checks(*monte_carlo_x_m()) == (True, True)


class UndecayedScore(GaussianScore):
    """A wrong score (negative controls): −(x − θ), the e^{−t} of the mean dropped."""

    def forward(self, x, t):
        return -(x - self.theta)


def test_linear_law_variance_check_fails_with_half_the_noise_variance():
    """Negative control of the Monte Carlo test, same checks and sample size: noise √h in place of
    √(2h) gives variance 0.58, not v = 1.05 (140 SE off): the variance check fails, the mean
    (1.105 = cθ) still passes."""
    def half_noise_step(x, model, m, *, generator=None, noise=None, **kw):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return euler_maruyama_step(x, model, m, noise=z / math.sqrt(2), **kw)

    assert law_checks(*monte_carlo_x_m(step=half_noise_step)) == (True, False)


def test_linear_law_mean_check_fails_with_a_wrong_score():
    """Negative control: the undecayed score −(x − θ) gives mean 1.69 = 1.3·1.30, not
    cθ = 1.3·0.85 = 1.105 (the tolerance is 0.011): the mean check fails."""
    assert law_checks(*monte_carlo_x_m(model=UndecayedScore(MC_THETA)))[0] is False


TINY = dict(num_sampling_steps=5, num_steps=250, progress=False)


def at_optimum(thetas, theta_star):
    """The mean of the last 50 θ within 0.1 of θ*."""
    return abs(np.mean(thetas[-50:]) - theta_star) < 0.1


def test_tiny_run_reaches_the_optimum():
    """M = 5, 250 iterations: the mean of the last 50 θ within 0.1 of θ* (spread over seeds ≈ 0.02;
    θ_target, the answer if c were ignored, is ≥ 0.25 away)."""
    cfg = Config(algorithms=("queue-pipelined", "nested-adjoint"), **TINY)
    r = run(cfg)
    assert abs(r.theta_star - cfg.theta_target) > 0.25
    for name, th in r.thetas.items():
        assert at_optimum(th, r.theta_star), name
    # the queue gives no update while it fills: θ is unchanged for the first M − 1 iterations
    assert np.all(r.thetas["queue-pipelined"][: cfg.num_sampling_steps - 1] == cfg.theta0)


def test_tiny_run_check_fails_for_wrong_settings(monkeypatch):
    """Negative controls of the tiny run, same config and at_optimum check against the true
    θ* = 2.396: (1) the reward's sign flipped (reward_weight −1: gradient ascent on
    (x − θ_target)², θ runs away from θ*, to ≈ −5·10⁷ after 250 iterations); (2) the
    model trained with the undecayed score −(x − θ), whose sampler gain is 1.345, not c = 0.835,
    so θ settles near θ_target / 1.345 = 1.49, 0.9 from θ*."""
    import implicit_diffusion.experiments.diffusion_gaussian_1d as experiment

    theta_star = run(Config(algorithms=("nested-adjoint",), **{**TINY, "num_steps": 1})).theta_star
    cls, options = experiment.ALGORITHMS["nested-adjoint"]
    monkeypatch.setitem(experiment.ALGORITHMS, "nested-adjoint-flipped-reward",
                        (cls, {**options, "reward_weight": -1.0}))
    flipped = run(Config(algorithms=("nested-adjoint-flipped-reward",), **TINY))
    assert not at_optimum(flipped.thetas["nested-adjoint-flipped-reward"], theta_star)

    monkeypatch.setattr(experiment, "GaussianScore", UndecayedScore)
    undecayed = run(Config(algorithms=("nested-adjoint",), **TINY))
    assert not at_optimum(undecayed.thetas["nested-adjoint"], theta_star)
    assert abs(np.mean(undecayed.thetas["nested-adjoint"][-50:]) - 2.0 / 1.34464) < 0.1  # where it settles
