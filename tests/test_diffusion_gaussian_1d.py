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


def test_linear_law_matches_monte_carlo():
    """200k samples of x_M at θ = 1.3: mean cθ and variance v within 5 SE."""
    sched = VPSchedule("ou", num_steps=10, T=1.0, t_min=0.0)
    c, v = linear_law(sched)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    with torch.no_grad():
        x = sample(euler_maruyama_step, GaussianScore(1.3), torch.randn(n, 1, generator=g, dtype=torch.float64),
                   schedule=sched, generator=g)[:, 0]
    assert abs(x.mean().item() - 1.3 * c) < 5 * math.sqrt(v / n)
    assert abs(x.var().item() - v) < 5 * v * math.sqrt(2 / (n - 1))


def test_tiny_run_reaches_the_optimum():
    """M = 5, 250 iterations: the mean of the last 50 θ within 0.1 of θ* (spread over seeds ≈ 0.02;
    θ_target, the answer if c were ignored, is ≥ 0.25 away)."""
    cfg = Config(num_sampling_steps=5, num_steps=250, algorithms=("queue-pipelined", "nested-adjoint"),
                 progress=False)
    r = run(cfg)
    assert abs(r.theta_star - cfg.theta_target) > 0.25
    for name, th in r.thetas.items():
        assert abs(np.mean(th[-50:]) - r.theta_star) < 0.1, name
    # the queue gives no update while it fills: θ is unchanged for the first M − 1 iterations
    assert np.all(r.thetas["queue-pipelined"][: cfg.num_sampling_steps - 1] == cfg.theta0)
