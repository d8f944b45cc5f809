"""VP noise schedules and prediction conversions: closed-form values (float64, exact), the time
grid, the forward marginal, round trips between score / ε / x̂₀ predictions, and input errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import assert_close64, f64, randn64

from implicit_diffusion.samplers.schedules import (
    PREDICTIONS,
    SCHEDULE_KINDS,
    VPSchedule,
    to_epsilon,
    to_score,
    to_x0,
)

KINDS = list(SCHEDULE_KINDS)




def grid(schedule: VPSchedule, n: int = 101) -> torch.Tensor:
    return torch.linspace(0.0, schedule.T, n, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Exact: schedule values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_bar_at_zero_is_one_and_sigma_is_its_complement(kind):
    s = VPSchedule(kind)
    t = grid(s)
    assert_close64(s.alpha_bar(f64(0.0)), f64(1.0))
    assert float(s.sigma(f64(0.0))) == 0.0
    assert_close64(s.sigma(t) ** 2 + s.alpha_bar(t), torch.ones_like(t))
    assert_close64(s.alpha_bar(t), torch.exp(s.log_alpha_bar(t)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [None, 2.5])
def test_beta_is_minus_the_derivative_of_log_alpha_bar(kind, T):
    """β(t) = −d log ᾱ/dt (autograd of log ᾱ, float64) on a grid covering [0, T], the cosine clip
    included; so ᾱ = exp(−∫β) with ᾱ(0) = 1, i.e. the forward SDE and ᾱ agree."""
    s = VPSchedule(kind, T=T)
    t = grid(s).requires_grad_(True)
    (dlog,) = torch.autograd.grad(s.log_alpha_bar(t).sum(), t)
    assert_close64(s.beta(t.detach()), -dlog)


def test_ou_schedule_is_the_papers_convention():
    """β ≡ 2, ᾱ(t) = e^{−2t} (dX = −X dt + √2 dB); default horizon T = 5, t_min = 1e-3."""
    s = VPSchedule("ou")
    assert (s.T, s.t_min, s.num_steps) == (5.0, 1e-3, 100)
    t = grid(s)
    assert_close64(s.alpha_bar(t), torch.exp(-2 * t))
    assert_close64(s.beta(t), torch.full_like(t, 2.0))
    assert_close64(s.sigma(t), torch.sqrt(1 - torch.exp(-2 * t)))


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_linear_schedule_closed_form(T):
    """β(t) = (β_min + (t/T)(β_max − β_min))/T, ∫₀ᵗβ = β_min u + (β_max − β_min)u²/2 with u = t/T
    (Song et al. 2021's VP SDE for T = 1); ᾱ(T) = e^{−10.05} whatever T."""
    s = VPSchedule("linear", T=T)
    assert (s.beta_min, s.beta_max) == (0.1, 20.0)
    t = grid(s)
    u = t / T
    assert_close64(s.beta(t), (0.1 + u * 19.9) / T)
    assert_close64(s.alpha_bar(t), torch.exp(-(0.1 * u + 19.9 * u**2 / 2)))
    assert_close64(s.alpha_bar(f64(T)), f64(math.exp(-10.05)))


def test_linear_schedule_matches_ddpm_betas():
    """With M = 1000 steps on [0, 1] the per-step α_m = ᾱ(t_m)/ᾱ(t_{m+1}) has −log α_m = ∫β over the
    step = β(t̄_m)/M at the midpoint t̄_m (exact: the midpoint rule integrates a linear β exactly), so
    β_m = 1 − α_m spans DDPM's 1e-4 … 0.02 (Ho et al. 2020) up to the O(β²) of 1 − e^{−β} and the
    half-step offset: first step 0.01979, last 1.0994e-4."""
    s = VPSchedule("linear", num_steps=1000, t_min=0.0)
    log_ab = s.log_alpha_bar(s.times)
    mid = (s.times[:-1] + s.times[1:]) / 2
    assert_close64(log_ab[1:] - log_ab[:-1], s.beta(mid) / 1000)
    betas = -torch.expm1(log_ab[:-1] - log_ab[1:])
    assert 0.0197 < float(betas[0]) < 0.02 and 1e-4 < float(betas[-1]) < 1.1e-4
    assert bool((betas[1:] < betas[:-1]).all())


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_cosine_schedule_formula_and_clip(T):
    """Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008, for
    t ≤ t_c; β_cos(t) = π tan(·)/((1 + s)T) reaches β_max/T at t_c, after which β = β_max/T and
    ᾱ(t) = ᾱ(t_c) e^{−β_max(t − t_c)/T}. For β_max = 20: t_c ≈ 0.9008 T, ᾱ(T) ≈ 3.3e-3."""
    s = VPSchedule("cosine", T=T)
    sc = 0.008

    def f(t):
        return torch.cos((t / T + sc) / (1 + sc) * math.pi / 2) ** 2

    def beta_cos(t):
        return math.pi / ((1 + sc) * T) * torch.tan((t / T + sc) / (1 + sc) * math.pi / 2)

    t_c = T * ((1 + sc) * 2 / math.pi * math.atan(20 * (1 + sc) / math.pi) - sc)
    assert_close64(beta_cos(f64(t_c)), f64(20 / T))
    assert 0.90 * T < t_c < 0.901 * T
    before = torch.linspace(0, t_c, 50, dtype=torch.float64)
    after = torch.linspace(t_c, T, 50, dtype=torch.float64)
    assert_close64(s.alpha_bar(before), f(before) / f(f64(0.0)))
    assert_close64(s.beta(before), beta_cos(before))
    assert_close64(s.beta(after), torch.full_like(after, 20 / T))
    assert_close64(s.alpha_bar(after), f(f64(t_c)) / f(f64(0.0)) * torch.exp(-20 * (after - t_c) / T))
    assert 3.2e-3 < float(s.alpha_bar(f64(T))) < 3.4e-3


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_bar_decreasing_and_dtype_follows_t(kind):
    s = VPSchedule(kind)
    ab = s.alpha_bar(grid(s, 1001))
    assert bool((ab[1:] < ab[:-1]).all()) and float(ab[-1]) > 0
    t32 = torch.linspace(0, s.T, 11, dtype=torch.float32)
    for fn in (s.alpha_bar, s.beta, s.sigma, s.log_alpha_bar):
        assert fn(t32).dtype == torch.float32 and fn(t32).shape == (11,)
        assert torch.isfinite(fn(t32)).all()
    assert s.alpha_bar(0.5).dtype == torch.float64  # Python numbers are float64


# ---------------------------------------------------------------------------------------------
# Exact: the time grid and the forward marginal
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_steps,t_min", [(1, 0.0), (7, 1e-3), (100, 0.05)])
def test_times_grid(kind, num_steps, t_min):
    s = VPSchedule(kind, num_steps=num_steps, t_min=t_min)
    times = s.times
    assert times.shape == (num_steps + 1,) and times.dtype == torch.float64
    assert float(times[0]) == s.T and float(times[-1]) == t_min
    assert bool((times[1:] < times[:-1]).all())
    assert_close64(times[:-1] - times[1:], torch.full((num_steps,), (s.T - t_min) / num_steps, dtype=torch.float64))
    times[0] = -1.0  # a fresh tensor each time: mutating one cannot corrupt the schedule
    assert float(s.times[0]) == s.T


@pytest.mark.parametrize("kind", KINDS)
def test_marginal_formula_broadcasts_over_event_dims(kind, generator):
    s = VPSchedule(kind)
    x0, n = randn64(generator, 5, 2, 3), randn64(generator, 5, 2, 3)
    t = torch.rand(5, generator=generator, dtype=torch.float64) * s.T
    xt = s.marginal(x0, t, n)
    for i in range(5):
        ab = s.alpha_bar(t[i])
        assert_close64(xt[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * n[i])
    assert_close64(s.marginal(x0, 0.7, n), s.marginal(x0, torch.full((5,), 0.7, dtype=torch.float64), n))
    assert_close64(s.marginal(x0, 0.0, n), x0)


# ---------------------------------------------------------------------------------------------
# Exact: conversions between prediction kinds
# ---------------------------------------------------------------------------------------------

CONVERT = {"score": to_score, "epsilon": to_epsilon, "x0": to_x0}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("event", [(3,), (2, 2, 3)], ids=["vector", "image"])
def test_conversion_formulas(kind, event, generator):
    """score = −ε/σ(t), x̂₀ = (x − σε)/√ᾱ, per sample t of shape (B,) broadcast over event dims."""
    s = VPSchedule(kind)
    B = 6
    x, eps = randn64(generator, B, *event), randn64(generator, B, *event)
    t = s.t_min + torch.rand(B, generator=generator, dtype=torch.float64) * (s.T - s.t_min)
    for i in range(B):
        ab = s.alpha_bar(t[i])
        sig = (1 - ab).sqrt()
        assert_close64(to_score(eps, x, t, s, "epsilon")[i], -eps[i] / sig)
        assert_close64(to_x0(eps, x, t, s, "epsilon")[i], (x[i] - sig * eps[i]) / ab.sqrt())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", PREDICTIONS)
def test_conversion_round_trips(kind, source, generator):
    """Any prediction → any kind → back is the identity; going through a third kind changes nothing."""
    s = VPSchedule(kind)
    x, pred = randn64(generator, 8, 2), randn64(generator, 8, 2)
    t = s.t_min + torch.rand(8, generator=generator, dtype=torch.float64) * (s.T - s.t_min)
    for target in PREDICTIONS:
        converted = CONVERT[target](pred, x, t, s, source)
        assert_close64(CONVERT[source](converted, x, t, s, target), pred)
        for via in PREDICTIONS:
            through = CONVERT[via](pred, x, t, s, source)
            assert_close64(CONVERT[target](through, x, t, s, via), converted)
    assert CONVERT[source](pred, x, t, s, source) is pred


@pytest.mark.parametrize("kind", KINDS)
def test_conversions_on_gaussian_data_closed_forms(kind, generator):
    """Data N(m, s²I): q_t = N(√ᾱ m, v I), v = ᾱs² + 1 − ᾱ. The exact score −(x − √ᾱ m)/v converts to
    paper-notes §6's ε* = σ(x − √ᾱ m)/v and to the posterior mean E[x₀|x] = m + s²√ᾱ(x − √ᾱ m)/v."""
    sch = VPSchedule(kind)
    m, s2 = f64([1.5, -0.5]), 0.3
    x = randn64(generator, 7, 2) * 2
    t = sch.t_min + torch.rand(7, generator=generator, dtype=torch.float64) * (sch.T - sch.t_min)
    ab = sch.alpha_bar(t)[:, None]
    v = ab * s2 + 1 - ab
    score = -(x - ab.sqrt() * m) / v
    assert_close64(to_epsilon(score, x, t, sch, "score"), (1 - ab).sqrt() * (x - ab.sqrt() * m) / v)
    assert_close64(to_x0(score, x, t, sch, "score"), m + s2 * ab.sqrt() * (x - ab.sqrt() * m) / v)


def test_conversion_rejects_unknown_prediction():
    s = VPSchedule()
    x = torch.zeros(2, 3)
    for fn in CONVERT.values():
        with pytest.raises(ValueError, match=r"unknown prediction 'noise'; allowed: score, epsilon, x0"):
            fn(x, x, torch.ones(2), s, "noise")


# ---------------------------------------------------------------------------------------------
# Invariants and errors
# ---------------------------------------------------------------------------------------------


def test_schedule_is_a_frozen_value():
    s = VPSchedule("linear", num_steps=10)
    assert s == VPSchedule("linear", 10, T=1.0) and hash(s) == hash(VPSchedule("linear", 10))
    assert VPSchedule("ou") == VPSchedule("ou", T=5.0) and VPSchedule("ou") != VPSchedule("ou", T=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_steps = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "quadratic"}, r"unknown schedule kind 'quadratic'; allowed: ou, linear, cosine"),
        ({"num_steps": 0}, r"num_steps must be an integer >= 1, got 0"),
        ({"num_steps": -3}, r"num_steps must be an integer >= 1, got -3"),
        ({"num_steps": 2.5}, r"num_steps must be an integer >= 1, got 2.5"),
        ({"num_steps": True}, r"num_steps must be an integer >= 1, got True"),
        ({"T": 0.0}, r"T must be a finite number > 0, got 0.0"),
        ({"T": -1.0}, r"T must be a finite number > 0"),
        ({"T": float("inf")}, r"T must be a finite number > 0"),
        ({"T": float("nan")}, r"T must be a finite number > 0"),
        ({"t_min": -1e-3}, r"t_min must satisfy 0 <= t_min < T = 5.0, got -0.001"),
        ({"t_min": 5.0}, r"t_min must satisfy 0 <= t_min < T = 5.0"),
        ({"kind": "linear", "beta_min": 30.0}, r"need 0 <= beta_min <= beta_max"),
        ({"kind": "linear", "beta_min": -0.1}, r"need 0 <= beta_min <= beta_max"),
        ({"kind": "linear", "beta_max": float("nan")}, r"need 0 <= beta_min <= beta_max"),
        ({"kind": "cosine", "cosine_s": 0.0}, r"cosine_s must be > 0, got 0.0"),
        ({"kind": "cosine", "beta_min": 0.0, "beta_max": 0.01}, r"beta_max=0.01 is below the cosine"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VPSchedule(**kwargs)
