"""The finetuning sampler's default reaches the exact law on Gaussian data; its path KL is exact.

Data N(0, s²), s = 0.1, with the exact score s*(x, t) = −x/(ᾱ(t)s² + 1 − ᾱ(t)): every Euler–Maruyama
or DDPM step is then x ↦ a_m x + c_m z, so the sampler's output law is N(0, v_M) exactly, with
v_{m+1} = a_m² v_m + c_m² (a_m, c_m read off the step itself with unit inputs). The target is the
law of x at the grid's last time t_min, N(0, ᾱ(t_min)s² + 1 − ᾱ(t_min)).

The tolerance, derived: the finetuning experiment judges its sampler on ``eval_samples`` = n draws.
For n normal draws the log of the sample variance has standard deviation √(2/(n − 1)) (delta method
on the χ²_{n−1}/(n − 1) law), so a sampler whose variance is off by less than three of those,
|log(v_M / v*)| < 3√(2/(n − 1)) (0.266 at n = 256: sd within [0.875, 1.142] of the exact), cannot
be told from the exact law by the experiment's own evaluation at three standard errors. The
default (DDPM ancestral steps, M = 50, grid power ρ = 2) is at −0.229. The negative controls fail:
Euler–Maruyama at M = 20 on the uniform grid (the earlier default, the issue's sd 0.263) at
+1.93, DDPM at M = 50 on the uniform grid at −0.75, and DDPM at M = 20 even at ρ = 2 (−0.51).
(Euler–Maruyama at M = 20, ρ = 2 passes on this test, +0.239, but misses real MNIST's pixel
statistics: docs/diffusion-finetune.md.)
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from conftest import gaussian_data_sampler_sd, gaussian_data_score, randn64

from implicit_diffusion.experiments import diffusion_finetune as ft
from implicit_diffusion.objectives.girsanov import DiscreteMeanKL, GirsanovKL, path_kl_cost, score_kl_weights
from implicit_diffusion.pretrained import load_pretrained
from implicit_diffusion.samplers import VPSchedule, ddim_step, ddpm_step, euler_maruyama_step, sample
from implicit_diffusion.samplers.diffusion import DIFFUSION_STEPS

S = 0.1  # data sd


def _exact_score(schedule: VPSchedule):
    return gaussian_data_score(schedule, S)


def _exact_law_sd(step, schedule: VPSchedule) -> float:
    """sd of x_M for x_0 ~ N(0, 1) under the exact score: the affine recursion of the steps."""
    return gaussian_data_sampler_sd(step, schedule, S)


def _target_sd(schedule: VPSchedule) -> float:
    ab = float(schedule.alpha_bar(schedule.times[-1].to(torch.float64)))
    return math.sqrt(ab * S**2 + 1 - ab)


def _tolerance(n: int) -> float:
    return 3 * math.sqrt(2 / (n - 1))


def _log_variance_error(step, schedule: VPSchedule) -> float:
    return 2 * math.log(_exact_law_sd(step, schedule) / _target_sd(schedule))


def _default_sampler() -> tuple[object, VPSchedule, int]:
    """The finetuning default's step and grid on the shipped digits model's schedule, and n."""
    c = ft.Config()
    assert c.time_power is None  # the model's default: ρ = DEFAULT_TIME_POWER on the shipped models' uniform grid
    schedule = replace(load_pretrained("digits").schedule, num_steps=c.num_sampling_steps,
                       time_power=ft.DEFAULT_TIME_POWER)
    return DIFFUSION_STEPS[c.sampler], schedule, c.eval_samples


def test_the_default_sampler_reaches_the_exact_law():
    step, schedule, n = _default_sampler()
    assert abs(_log_variance_error(step, schedule)) < _tolerance(n)


@pytest.mark.parametrize("step,steps,power", [(euler_maruyama_step, 20, 1.0), (ddpm_step, 50, 1.0),
                                              (ddpm_step, 20, 2.0), (ddim_step, 20, 1.0)],
                         ids=["euler-maruyama-m20-uniform", "ddpm-m50-uniform", "ddpm-m20-bent", "ddim-m20-uniform"])
def test_other_samplers_fail_the_same_check(step, steps, power):
    """Negative controls: Euler–Maruyama at M = 20 on the uniform grid (the previous default), DDPM on
    the uniform grid or with fewer steps, DDIM."""
    _, schedule, n = _default_sampler()
    assert (schedule.num_steps, schedule.time_power) == (50, 2.0)
    assert abs(_log_variance_error(step, replace(schedule, num_steps=steps, time_power=power))) > _tolerance(n)


def test_the_recursion_is_the_sampler(generator):
    """20,000 draws of the default sampler: their sd is the recursion's within 5 SE (sd/√(2n)); the
    uniform grid's recursion is > 5 SE away (the check sees which grid was stepped on)."""
    step, schedule, _ = _default_sampler()
    n = 20_000
    x0 = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    sd = float(sample(step, _exact_score(schedule), x0, schedule=schedule, generator=generator,
                      prediction="score").std())
    exact, other = _exact_law_sd(step, schedule), _exact_law_sd(step, replace(schedule, time_power=1.0))
    assert abs(sd - exact) < 5 * exact / math.sqrt(2 * n) < abs(sd - other)


class _Net(torch.nn.Module):
    """A small ε-predictor in float64: the exact ε*(x, t) = σ(t)x of N(0, I) data plus a learned
    perturbation (so samples stay O(1) and the losses well conditioned)."""

    prediction = "epsilon"

    def __init__(self, generator, schedule: VPSchedule | None = None):
        super().__init__()
        self.schedule = schedule or VPSchedule("linear", num_steps=1)
        self.w = torch.nn.Parameter(0.5 * randn64(generator, 3, 2))
        self.b = torch.nn.Parameter(0.3 * randn64(generator, 2))

    def forward(self, x, t):
        sigma = self.schedule.sigma(t)[:, None].to(x.dtype)
        return sigma * x + 0.3 * torch.tanh(torch.cat([x, t[:, None]], 1) @ self.w + self.b)


@pytest.mark.parametrize("step", [euler_maruyama_step, ddpm_step], ids=["euler-maruyama", "ddpm"])
def test_the_path_kl_is_the_exact_kl_of_the_gaussian_transitions(step, generator):
    """path_kl_cost(·, step) equals DiscreteMeanKL, Σ_m ‖μ_θ − μ_θ₀‖²/(2σ_m²) with the step's own means
    and noise sd σ_m (read off the step), at every m, to 1e-12; the other step's weights do not."""
    schedule = VPSchedule("linear", num_steps=6, time_power=2.0)
    net = _Net(generator)
    x = randn64(generator, 5, 2)
    one, zero = torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    sigmas = [float(step(zero, lambda y, t: torch.zeros_like(y), m, schedule=schedule, noise=one)[0, 0])
              for m in range(6)]
    costs = {s: path_kl_cost(net, schedule, 0.7, s) for s in (euler_maruyama_step, ddpm_step)}
    exact = DiscreteMeanKL(step, net, sigmas, 0.7, schedule=schedule, prediction="epsilon")
    with torch.no_grad():
        net.b.add_(0.2)  # θ ≠ θ₀
        for m in range(6):
            truth = float(exact(x, m))
            assert truth > 0
            assert float(costs[step](x, m)) == pytest.approx(truth, rel=1e-12)
            per_sample = costs[step].per_sample(x, torch.full((5,), m))  # the queue's batched form
            assert float(per_sample.mean()) == pytest.approx(truth, rel=1e-12)
            other = ddpm_step if step is euler_maruyama_step else euler_maruyama_step
            assert float(costs[other](x, m)) != pytest.approx(truth, rel=1e-3)


def test_ddpm_weights_tend_to_girsanov_on_fine_steps():
    """Away from the last steps (where t_min is comparable to h) the DDPM weight is ½β(t_m)h_m to first
    order: relative gap below β(t_m)h_m, and halving h halves it."""
    gaps = []
    for M in (2_000, 4_000):
        schedule = VPSchedule("linear", num_steps=M)
        ddpm, em = score_kl_weights(ddpm_step, schedule), score_kl_weights(euler_maruyama_step, schedule)
        kl = GirsanovKL(torch.nn.Linear(1, 1), schedule, prediction="score")
        assert em == pytest.approx(kl.step_weights, rel=1e-12)
        gap = [abs(d / e - 1) for d, e in zip(ddpm[: M // 2], em[: M // 2])]
        assert all(g < 2 * e for g, e in zip(gap, em))  # 2·½βh = βh
        gaps.append(max(gap))
    assert gaps[1] == pytest.approx(gaps[0] / 2, rel=0.05)


def test_deterministic_steps_have_no_closed_form_path_kl():
    with pytest.raises(ValueError, match="no closed-form path KL for the step ddim_step"):
        score_kl_weights(ddim_step, VPSchedule("linear", num_steps=4))


def test_step_weights_are_checked():
    schedule = VPSchedule("linear", num_steps=3)
    with pytest.raises(ValueError, match=r"step_weights must be 3 finite numbers >= 0 \(one per step\)"):
        GirsanovKL(torch.nn.Linear(1, 1), schedule, step_weights=[1.0, 2.0], prediction="score")
    with pytest.raises(ValueError, match="step_weights must be 3 finite numbers"):
        GirsanovKL(torch.nn.Linear(1, 1), schedule, step_weights=[1.0, -2.0, 0.0], prediction="score")


def test_finetune_takes_the_sampler_and_checks_it():
    assert ft.Config().sampler == "ddpm" and ft.DEFAULT_TIME_POWER == 2.0
    assert ft.Config(sampler="euler-maruyama").sampler == "euler-maruyama"
    with pytest.raises(ft.ConfigError, match="config key 'sampler'.*'ddim'.*ddpm, euler-maruyama"):
        ft.Config(sampler="ddim")


@pytest.mark.parametrize("step", [euler_maruyama_step, ddpm_step], ids=["euler-maruyama", "ddpm"])
def test_adjoint_with_the_path_kl_equals_autograd_and_finite_differences(step, generator):
    """The finetune's composition — the real step on a bent grid, ε-prediction, path_kl_cost(·, step)
    as the running cost — adjoint == autograd (rel 1e-10) == central differences (h = 1e-5; tolerance
    50·ε|L|/h + 1e-8 as derived in test_adjoint.test_matches_finite_differences), noise fixed."""
    from conftest import assert_close64

    from implicit_diffusion.objectives.adjoint import adjoint_through_sampler, autograd_through_sampler

    schedule = VPSchedule("linear", num_steps=5, time_power=2.0)
    net = _Net(generator)
    cost = path_kl_cost(net, schedule, 0.7, step)
    with torch.no_grad():
        net.b.add_(0.2)  # θ ≠ θ₀
    x0, noises = randn64(generator, 4, 2), randn64(generator, 5, 4, 2)

    def reward(x):
        return -((x - torch.tensor([1.0, -0.5], dtype=torch.float64)) ** 2).sum(1) + torch.sin(2 * x[:, 0])

    def loss(fn):
        for p in net.parameters():
            p.grad = None
        info = fn(step, net, x0, noises, reward, schedule=schedule, weight=1.3, running_cost=cost, num_steps=5,
                  prediction="epsilon")
        return info, [p.grad.clone() for p in net.parameters()]

    (_, g_ref), (adj, g_adj) = loss(autograd_through_sampler), loss(adjoint_through_sampler)
    for a, r in zip(g_adj, g_ref):
        assert_close64(a, r)
    assert float(adj.running_cost) > 0
    h = 1e-5
    for p, g in zip(net.parameters(), g_adj):
        idx = (0,) * p.ndim
        with torch.no_grad():
            old = p[idx].item()
            values = []
            for v in (old + h, old - h):
                p[idx] = v
                values.append(float(loss(autograd_through_sampler)[0].loss))
            p[idx] = old
        fd = (values[0] - values[1]) / (2 * h)
        assert abs(fd - float(g[idx])) <= 50 * 2.2e-16 * abs(float(adj.loss)) / h + 1e-8
