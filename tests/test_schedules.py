"""VP noise schedules and prediction conversions: closed-form values (float64, exact), the time
grid, the forward marginal, round trips between score / ε / x̂₀ predictions, and input errors;
the "discrete" kind (an ᾱ table): exact on its grid, β consistent with its interpolation, diffusers'
spacings, serialisation (JSON, pickle, model files), and the adjoint through a DDPM step on it.
(Against diffusers' own schedulers: tests/test_diffusers.py.)"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle

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
ALL_KINDS = [*KINDS, "discrete"]


def ddpm_table(n: int = 1000) -> list[float]:
    """ᾱ_i = Π_{j ≤ i}(1 − β_j) of DDPM's linear β_j ∈ [1e-4, 0.02] for n = 1000 (Ho et al. 2020), the
    end rate scaled by 1000/n for fewer steps (at most 0.5), float64."""
    betas = torch.linspace(1e-4, min(0.02 * 1000 / n, 0.5), n, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).tolist()


def make(kind: str, **kwargs) -> VPSchedule:
    """``VPSchedule(kind)``, with DDPM's 1000-step table for ``"discrete"``."""
    if kind == "discrete":
        kwargs.setdefault("alphas_cumprod", ddpm_table())
    return VPSchedule(kind, **kwargs)


def grid(schedule: VPSchedule, n: int = 101) -> torch.Tensor:
    return torch.linspace(0.0, schedule.T, n, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Exact: schedule values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_alpha_bar_at_zero_is_one_and_sigma_is_its_complement(kind):
    s = make(kind)
    t = grid(s)
    assert_close64(s.alpha_bar(f64(0.0)), f64(1.0))
    assert float(s.sigma(f64(0.0))) == 0.0
    assert_close64(s.sigma(t) ** 2 + s.alpha_bar(t), torch.ones_like(t))
    assert_close64(s.alpha_bar(t), torch.exp(s.log_alpha_bar(t)))


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("T", [None, 2.5])
def test_beta_is_minus_the_derivative_of_log_alpha_bar(kind, T):
    """β(t) = −d log ᾱ/dt (autograd of log ᾱ, float64) on a grid covering [0, T], the cosine clip
    included; so ᾱ = exp(−∫β) with ᾱ(0) = 1, i.e. the forward SDE and ᾱ agree."""
    s = make(kind, T=T)
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


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_alpha_bar_decreasing_and_dtype_follows_t(kind):
    s = make(kind)
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


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_marginal_formula_broadcasts_over_event_dims(kind, generator):
    s = make(kind)
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


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("event", [(3,), (2, 2, 3)], ids=["vector", "image"])
def test_conversion_formulas(kind, event, generator):
    """score = −ε/σ(t), x̂₀ = (x − σε)/√ᾱ, per sample t of shape (B,) broadcast over event dims."""
    s = make(kind)
    B = 6
    x, eps = randn64(generator, B, *event), randn64(generator, B, *event)
    t = s.t_min + torch.rand(B, generator=generator, dtype=torch.float64) * (s.T - s.t_min)
    for i in range(B):
        ab = s.alpha_bar(t[i])
        sig = (1 - ab).sqrt()
        assert_close64(to_score(eps, x, t, s, "epsilon")[i], -eps[i] / sig)
        assert_close64(to_x0(eps, x, t, s, "epsilon")[i], (x[i] - sig * eps[i]) / ab.sqrt())


@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("source", PREDICTIONS)
def test_conversion_round_trips(kind, source, generator):
    """Any prediction → any kind → back is the identity; going through a third kind changes nothing."""
    s = make(kind)
    x, pred = randn64(generator, 8, 2), randn64(generator, 8, 2)
    t = s.t_min + torch.rand(8, generator=generator, dtype=torch.float64) * (s.T - s.t_min)
    for target in PREDICTIONS:
        converted = CONVERT[target](pred, x, t, s, source)
        assert_close64(CONVERT[source](converted, x, t, s, target), pred)
        for via in PREDICTIONS:
            through = CONVERT[via](pred, x, t, s, source)
            assert_close64(CONVERT[target](through, x, t, s, via), converted)
    assert CONVERT[source](pred, x, t, s, source) is pred


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_conversions_on_gaussian_data_closed_forms(kind, generator):
    """Data N(m, s²I): q_t = N(√ᾱ m, v I), v = ᾱs² + 1 − ᾱ. The exact score −(x − √ᾱ m)/v converts to
    paper-notes §6's ε* = σ(x − √ᾱ m)/v and to the posterior mean E[x₀|x] = m + s²√ᾱ(x − √ᾱ m)/v."""
    sch = make(kind)
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
        ({"kind": "quadratic"}, r"unknown schedule kind 'quadratic'; allowed: ou, linear, cosine, discrete"),
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


# ---------------------------------------------------------------------------------------------
# The "discrete" kind: a table of ᾱ on a training grid
# ---------------------------------------------------------------------------------------------


def zigzag_table(n: int = 1000) -> list[float]:
    """ᾱ of discrete rates alternating 0.01, 0.03: neighbouring intervals' β differ threefold, so
    taking the wrong interval at a grid point is visible."""
    betas = torch.tensor([0.01, 0.03] * (n // 2), dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).tolist()


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_discrete_schedule_is_its_table_on_the_grid(T):
    """ᾱ(t_n) = ᾱ_{n−1} at t_n = nT/N exactly (n = 1..N; float64 rounding only), ᾱ(0) = 1, σ(0) = 0;
    log ᾱ is linear in t between grid points (the midpoint is the mean of the ends)."""
    table = ddpm_table(1000)
    s = VPSchedule("discrete", alphas_cumprod=table, T=T)
    assert (s.T, s.t_min, s.spacing, s.steps_offset) == (T, 0.0, "leading", 0)
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000 * T
    ab = torch.tensor(table, dtype=torch.float64)
    assert_close64(s.alpha_bar(t), ab, rtol=1e-14, atol=0)
    assert_close64(s.sigma(t), (1 - ab).sqrt(), rtol=1e-14, atol=0)
    assert float(s.alpha_bar(0.0)) == 1.0 and float(s.sigma(0.0)) == 0.0
    lab = s.log_alpha_bar(torch.cat([f64([0.0]), t]))
    assert_close64(s.log_alpha_bar(t - 0.5 * T / 1000), (lab[1:] + lab[:-1]) / 2)
    assert_close64(s.log_alpha_bar(t - 0.25 * T / 1000), 0.75 * lab[1:] + 0.25 * lab[:-1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discrete_beta_is_piecewise_constant_and_takes_the_interval_below_a_grid_point(dtype):
    """β = (N/T)·log(ᾱ_{n−1}/ᾱ_n) on (t_{n−1}, t_n] (ᾱ_{−1} := 1): at the grid points, just below them,
    and at float32 grid times (off by rounding, either side); −d log ᾱ/dt by autograd is the same β.
    Control: the interval above differs by a factor ≈ 3 at each grid point (zigzag rates)."""
    N = 1000
    table = zigzag_table(N)
    s = VPSchedule("discrete", alphas_cumprod=table)
    log_ab = torch.log(torch.tensor([1.0, *table], dtype=torch.float64))
    rates = N * (log_ab[:-1] - log_ab[1:])  # rate of (t_{n−1}, t_n], n = 1..N
    t = (torch.arange(1, N + 1, dtype=torch.float64) / N).to(dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-3  # float32: the table's differences lose ~1e-5
    torch.testing.assert_close(s.beta(t).double(), rates, rtol=rtol, atol=0)
    torch.testing.assert_close(s.beta(t - 0.3 / N).double(), rates, rtol=rtol, atol=0)
    assert bool(((s.beta(t[:-1]).double() / rates[1:] - 1).abs() > 0.5).all())  # not the interval above
    tg = t.clone().requires_grad_(True)
    (dlog,) = torch.autograd.grad(s.log_alpha_bar(tg).sum(), tg)
    torch.testing.assert_close(-dlog.double(), rates, rtol=rtol, atol=0)
    assert float(s.beta(0.0)) == pytest.approx(float(rates[0]), rel=1e-12)  # the first interval's rate


def test_discrete_times_follow_diffusers_spacings():
    """The training indices of diffusers' ``set_timesteps`` (worked by hand for N = 10, M = 3), times
    (i + 1)T/N then t_min; ``spacing="uniform"`` is linspace(T, t_min) as for the other kinds."""
    table = ddpm_table(10)
    expected = {("leading", 0): [6, 3, 0], ("leading", 1): [7, 4, 1], ("trailing", 0): [9, 6, 2],
                ("linspace", 0): [9, 4, 0]}  # trailing: round(10, 6.67, 3.33) − 1; linspace: round(9, 4.5, 0)
    for (spacing, offset), idx in expected.items():
        s = VPSchedule("discrete", num_steps=3, alphas_cumprod=table, spacing=spacing, steps_offset=offset, T=2.0)
        assert s.timesteps.tolist() == idx and s.timesteps.dtype == torch.int64
        assert_close64(s.times, f64([(i + 1) * 2.0 / 10 for i in idx] + [0.0]))
        assert_close64(s.alpha_bar(s.times[:-1]), torch.tensor(table, dtype=torch.float64)[idx])
        s.times[0] = -1.0  # a fresh tensor each time
        assert float(s.times[0]) == (idx[0] + 1) / 10 * 2.0
    u = VPSchedule("discrete", num_steps=4, alphas_cumprod=table, spacing="uniform", t_min=0.05)
    assert_close64(u.times, torch.linspace(1.0, 0.05, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="timesteps need kind 'discrete' with spacing leading"):
        u.timesteps  # noqa: B018
    with pytest.raises(ValueError, match="timesteps need kind 'discrete'"):
        VPSchedule("linear").timesteps  # noqa: B018


def test_resampling_with_fewer_steps_stays_on_the_grid():
    """``dataclasses.replace(schedule, num_steps=M)`` (what finetuning does) gives M steps from grid
    points (leading: i_m = (M − 1 − m)⌊N/M⌋), the last one to t_min; the table is unchanged."""
    s = VPSchedule("discrete", num_steps=100, alphas_cumprod=ddpm_table(1000))
    for M in (1, 3, 20, 30, 1000):
        r = dataclasses.replace(s, num_steps=M)
        k = 1000 // M
        assert r.timesteps.tolist() == [(M - 1 - m) * k for m in range(M)]
        assert r.times.shape == (M + 1,) and float(r.times[-1]) == 0.0
        assert r.alphas_cumprod is s.alphas_cumprod or r.alphas_cumprod == s.alphas_cumprod
        assert_close64(r.times[:-1] * 1000, (r.timesteps + 1).double())


def test_discrete_schedule_is_a_frozen_serialisable_value():
    """Equal and hashable by value (a list table becomes a tuple); JSON (as model files store it),
    pickle and deepcopy give an equal schedule that computes the same values."""
    table = ddpm_table(50)
    s = VPSchedule("discrete", num_steps=7, alphas_cumprod=table, spacing="trailing")
    assert isinstance(s.alphas_cumprod, tuple) and s == VPSchedule("discrete", 7, alphas_cumprod=tuple(table),
                                                                   spacing="trailing")
    assert hash(s) == hash(VPSchedule("discrete", 7, alphas_cumprod=table, spacing="trailing"))
    assert s != dataclasses.replace(s, spacing="leading") and s != VPSchedule("discrete", 7, alphas_cumprod=table[:-1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.alphas_cumprod = ()  # type: ignore[misc]
    t = torch.rand(9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for other in (VPSchedule(**json.loads(json.dumps(dataclasses.asdict(s)))), pickle.loads(pickle.dumps(s)),
                  copy.deepcopy(s)):
        assert other == s and other.alphas_cumprod == s.alphas_cumprod
        assert torch.equal(other.alpha_bar(t), s.alpha_bar(t)) and torch.equal(other.times, s.times)


def test_discrete_schedule_round_trips_through_a_model_file_and_old_files_still_load(tmp_path):
    """``save_score_model`` stores the schedule's fields as JSON: a discrete schedule comes back equal;
    a file written before the discrete kind existed (no alphas_cumprod / spacing / steps_offset)
    loads with the old meaning (uniform times)."""
    from implicit_diffusion.models import ScoreMLP
    from implicit_diffusion.models.io import load_score_model, save_score_model
    from implicit_diffusion.serialization import save_tensors

    model = ScoreMLP(2, hidden=8, depth=1, prediction="epsilon")
    s = VPSchedule("discrete", num_steps=20, alphas_cumprod=ddpm_table(1000))
    save_score_model(tmp_path / "new.safetensors", model, s)
    loaded = load_score_model(tmp_path / "new.safetensors").schedule
    assert loaded == s and torch.equal(loaded.times, s.times)
    old = {"kind": "cosine", "num_steps": 37, "T": 1.0, "t_min": 0.01, "beta_min": 0.1, "beta_max": 20.0,
           "cosine_s": 0.008}  # the schedule JSON of a file from before
    meta = {"format": "implicit-diffusion/score-model", "version": "1", "class": "ScoreMLP",
            "config": json.dumps(model.config), "schedule": json.dumps(old), "extra": "{}"}
    save_tensors(tmp_path / "old.safetensors", model.state_dict(), meta)
    loaded = load_score_model(tmp_path / "old.safetensors").schedule
    assert loaded == VPSchedule("cosine", num_steps=37, t_min=0.01) and loaded.spacing == "uniform"
    assert_close64(loaded.times, torch.linspace(1.0, 0.01, 38, dtype=torch.float64))


def test_adjoint_through_ddpm_steps_on_a_discrete_schedule_equals_autograd(generator):
    """The adjoint sweep (objectives/adjoint.py) through M = 5 real ``ddpm_step``s (ε-prediction) on
    a discrete schedule (N = 100, leading spacing, last step to t = 0), and through Euler–Maruyama
    with the Girsanov path KL (which weighs steps by this schedule's β), equals autograd through
    the unrolled steps, noise fixed (float64, rel 1e-10)."""
    from implicit_diffusion.objectives.adjoint import adjoint_through_sampler, autograd_through_sampler
    from implicit_diffusion.objectives.girsanov import GirsanovKL
    from implicit_diffusion.samplers.diffusion import ddpm_step, euler_maruyama_step

    sch = VPSchedule("discrete", num_steps=5, alphas_cumprod=ddpm_table(100))
    assert sch.timesteps.tolist() == [80, 60, 40, 20, 0]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(0.5 * randn64(generator, 3, 2))
            self.b = torch.nn.Parameter(0.3 * randn64(generator, 2))

        def forward(self, x, t):
            return torch.tanh(torch.cat([x, t[:, None]], 1) @ self.w + self.b) - 0.5 * x

    net = Net()
    x0, noises = randn64(generator, 4, 2), randn64(generator, 5, 4, 2)

    def reward(x):
        return -((x - f64([1.0, -0.5])) ** 2).sum(1) + torch.sin(2 * x[:, 0])

    score_kl = GirsanovKL(net, sch, 0.7, prediction="score")
    cases = [(ddpm_step, None, "epsilon"), (euler_maruyama_step, score_kl, "score")]
    with torch.no_grad():  # θ ≠ θ₀ of the path KL
        net.b.add_(0.2)
    for step, cost, prediction in cases:
        results = []
        for fn in (autograd_through_sampler, adjoint_through_sampler):
            for p in net.parameters():
                p.grad = None
            info = fn(step, net, x0, noises, reward, schedule=sch, weight=1.3, running_cost=cost, num_steps=5,
                      prediction=prediction)
            results.append((info, [p.grad.clone() for p in net.parameters()]))
        (ref, g_ref), (adj, g_adj) = results
        for a, r in zip(g_adj, g_ref):
            assert_close64(a, r)
            assert float(r.abs().max()) > 0
        assert_close64(adj.grad_x_init, ref.grad_x_init)
        assert_close64(adj.loss, ref.loss)
        assert (float(ref.running_cost) > 0) == (cost is not None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "discrete"}, r"kind 'discrete' needs alphas_cumprod"),
        ({"kind": "discrete", "alphas_cumprod": []}, r"non-empty, strictly decreasing .* got an empty one"),
        ({"kind": "discrete", "alphas_cumprod": [0.9, 0.9, 0.5]}, r"strictly decreasing .*; entry 1 is 0.9"),
        ({"kind": "discrete", "alphas_cumprod": [1.0, 0.5]}, r"in \(0, 1\); entry 0 is 1.0"),
        ({"kind": "discrete", "alphas_cumprod": [0.5, 0.0]}, r"entry 1 is 0.0"),
        ({"kind": "discrete", "alphas_cumprod": [0.5, float("nan")]}, r"entry 1 is nan"),
        ({"kind": "discrete", "alphas_cumprod": ["a"]}, r"alphas_cumprod must be a sequence of numbers"),
        ({"kind": "discrete", "alphas_cumprod": 0.5}, r"alphas_cumprod must be a sequence of numbers, got float"),
        ({"kind": "linear", "alphas_cumprod": [0.5]}, r"alphas_cumprod is for kind 'discrete' only, got it with "
                                                      r"kind 'linear'"),
        ({"kind": "ou", "spacing": "leading"}, r"spacing 'leading' needs kind 'discrete' .* allowed for kind "
                                               r"'ou': uniform"),
        ({"kind": "discrete", "alphas_cumprod": [0.5], "spacing": "middle"},
         r"unknown spacing 'middle'; allowed: uniform, leading, trailing, linspace"),
        ({"kind": "discrete", "alphas_cumprod": [0.5], "steps_offset": -1}, r"steps_offset must be an integer >= 0"),
        ({"kind": "discrete", "alphas_cumprod": [0.5], "num_steps": 1, "spacing": "trailing", "steps_offset": 1},
         r"steps_offset=1 needs spacing 'leading', got 'trailing'"),
        ({"kind": "discrete", "alphas_cumprod": [0.9, 0.5], "num_steps": 3},
         r"num_steps=3 is more than the 2 training steps .* allowed: num_steps <= 2, or spacing 'uniform'"),
        ({"kind": "discrete", "alphas_cumprod": [0.9, 0.5], "num_steps": 2, "steps_offset": 1},
         r"gives training indices \[2, 1\]… for num_steps=2 of 2; allowed: 2 distinct indices < 2"),
        ({"kind": "discrete", "alphas_cumprod": [0.9, 0.5, 0.2, 0.1], "num_steps": 2, "t_min": 0.25},
         r"t_min=0.25 must lie below the last grid time 0.25 \(training index 0\)"),
    ],
)
def test_discrete_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VPSchedule(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_discrete_schedule_on_a_gpu_equals_the_cpu():
    """Values (float64 and float32) and a DDPM step on CUDA equal the CPU's to rounding; a schedule
    used on the GPU still pickles (its per-device tables are not part of its state)."""
    from implicit_diffusion.samplers.diffusion import ddpm_step

    s = VPSchedule("discrete", num_steps=20, alphas_cumprod=ddpm_table())
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        t = torch.cat([s.times, s.times[:-1] - 3e-4]).to(dtype)
        for fn in (s.log_alpha_bar, s.alpha_bar, s.sigma, s.beta):
            gpu = fn(t.cuda())
            assert gpu.device.type == "cuda" and gpu.dtype == dtype
            torch.testing.assert_close(gpu.cpu(), fn(t), rtol=rtol, atol=1e-12)
    x, z = randn64(torch.Generator().manual_seed(0), 5, 2), randn64(torch.Generator().manual_seed(1), 5, 2)
    cpu = ddpm_step(x, lambda y, t: torch.tanh(y) * t[:, None], 3, schedule=s, noise=z, prediction="epsilon")
    gpu = ddpm_step(x.cuda(), lambda y, t: torch.tanh(y) * t[:, None], 3, schedule=s, noise=z.cuda(),
                    prediction="epsilon")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)
    assert pickle.loads(pickle.dumps(s)) == s
