"""The opt-in guard: non-finite particle moves rejected, θ updates with a non-finite Γ skipped."""

from __future__ import annotations

import pytest
import torch

from implicit_diffusion import FunctionPotential, RewardEstimator, SingleLoop
from implicit_diffusion.algorithms import NestedLoop
from implicit_diffusion.algorithms.base import apply_surrogate
from implicit_diffusion.objectives import Surrogate


class GlitchyReward:
    """R(x) = −(x₁ − 2)² (optimum θ = 2 for π*(θ) = N(θ, I)), except that every 10th call returns a
    NaN for one particle: a user function that fails on rare inputs."""

    __name__ = "glitchy_reward"

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        r = -(x[:, 0] - 2.0) ** 2
        if self.calls % 10 == 0:
            r = r.clone()
            r[self.calls % x.shape[0]] = float("nan")
        return r


def run(nonfinite: str, steps: int = 600):
    from implicit_diffusion.models import GaussianPotential

    V = GaussianPotential(torch.zeros(2))
    algo = SingleLoop(V, RewardEstimator(GlitchyReward()), torch.optim.SGD(V.parameters(), lr=0.05), step_size=0.3,
                      nonfinite=nonfinite)
    g = torch.Generator().manual_seed(0)
    skipped = []
    algo.run(torch.randn(400, 2, generator=g), steps, generator=g,
             callbacks=[lambda k, x, s: skipped.append(float(s.get("update_skipped", 0.0)))])
    return V.mean.detach(), skipped


def test_without_the_guard_one_glitch_makes_theta_nan():
    theta, _ = run("update")
    assert not torch.isfinite(theta).all()


def test_with_the_guard_the_glitching_updates_are_skipped_and_theta_converges():
    theta, skipped = run("skip")
    assert torch.isfinite(theta).all()
    assert [k for k, s in enumerate(skipped) if s] == list(range(9, 600, 10))  # exactly the glitching calls
    assert abs(float(theta[0]) - 2.0) < 0.2 and abs(float(theta[1])) < 0.2  # θ* = (2, 0)


def test_non_finite_particle_moves_are_rejected_row_by_row():
    from implicit_diffusion.samplers import reject_nonfinite, ula_step

    step = reject_nonfinite(ula_step)
    V = lambda x: (x**2).sum(-1) / 2  # noqa: E731
    x = torch.tensor([[1.0, 1.0], [1e30, 0.0], [0.5, -0.5]])
    noise = torch.tensor([[0.0, 0.0], [0.0, 0.0], [float("nan"), 0.0]])
    x1, _ = step(x, V, step_size=1e10, noise=noise)
    assert torch.equal(x1[1], x[1]) and torch.equal(x1[2], x[2])  # overflow (row 1), NaN (row 2): kept
    assert torch.isfinite(x1[0]).all() and not torch.equal(x1[0], x[0])  # row 0 moved
    assert int(step.rejected) == 2


def test_a_non_finite_gamma_leaves_theta_and_the_optimizer_state_alone():
    V = FunctionPotential(lambda x, th: ((x - th) ** 2).sum(-1), torch.zeros(2))
    opt = torch.optim.Adam(V.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (k + 1))
    good = Surrogate((torch.ones(3, 2),), (torch.ones(3),), {})
    assert apply_surrogate(V, good, opt, sched, nonfinite="skip")
    theta, state = V.theta.detach().clone(), {k: v.clone() for k, v in opt.state[V.theta].items()}
    bad = Surrogate((torch.ones(3, 2),), (torch.tensor([1.0, float("nan"), 1.0]),), {})
    assert not apply_surrogate(V, bad, opt, sched, nonfinite="skip")
    assert torch.equal(V.theta.detach(), theta)
    assert all(torch.equal(opt.state[V.theta][k], v) for k, v in state.items())
    assert sched.last_epoch == 2  # the schedule still advanced
    assert V.theta.grad is None
    assert apply_surrogate(V, bad, opt, sched) and not torch.isfinite(V.theta).all()  # default: applied


def test_bad_option_is_named():
    V = FunctionPotential(lambda x, th: ((x - th) ** 2).sum(-1), torch.zeros(2))
    opt = torch.optim.SGD(V.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="nonfinite must be one of update, skip, got 'clip'"):
        SingleLoop(V, RewardEstimator(lambda x: x[:, 1]), opt, step_size=0.1, nonfinite="clip")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        NestedLoop(V, RewardEstimator(lambda x: x[:, 1]), opt, init_fn=lambda g: torch.ones(4, 2),
                   num_inner_steps=2, step_size=0.1, nonfinite="reject")
