"""Diffusion sampler steps (reverse SDE, probability-flow ODE, DDPM, DDIM).

Exact (float64): each step with fixed noise against a hand-written formula, for every schedule and
prediction kind; per-sample step indices m; on Gaussian data N(m, s²I) with the exact predictor every
step is affine + Gaussian, x_{m+1} = a x + k·mean + √q z, with (a, k, q) derived below and checked
exactly, which gives the exact law after M steps by a mean/variance recursion. Statistical: DDPM and
Euler–Maruyama samples against that law, each with negative controls. Convergence orders of the
deterministic samplers from the exact affine maps. RNG discipline, invariants, gradients, errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Z, assert_close64, f64, mean_within, randn64, var_within
from torch import nn

from implicit_diffusion.samplers.diffusion import (
    DIFFUSION_STEPS,
    ddim_step,
    ddpm_step,
    euler_maruyama_step,
    probability_flow_euler_step,
    probability_flow_heun_step,
    sample,
)
from implicit_diffusion.samplers.schedules import VPSchedule

STEPS = list(DIFFUSION_STEPS)
STOCHASTIC = {"euler-maruyama", "ddpm"}
KINDS = ["ou", "linear", "cosine"]
PREDICTIONS = ["score", "epsilon", "x0"]




def col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …, 1) against x."""
    return v.reshape(v.shape + (1,) * (x.ndim - 1))


class TinyNet(nn.Module):
    """A generic time-conditioned model (B, *event) × (B,) → (B, *event), float64, fixed weights."""

    def __init__(self, event=(2,), hidden=8):
        super().__init__()
        d = math.prod(event)
        self.l1, self.l2 = nn.Linear(d + 1, hidden), nn.Linear(hidden, d)
        g = torch.Generator().manual_seed(7)
        self.double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)

    def forward(self, x, t):
        h = torch.tanh(self.l1(torch.cat([x.flatten(1), t[:, None]], dim=1)))
        return self.l2(h).view_as(x)


class GaussianDataModel(nn.Module):
    """Exact predictor for data N(mean, s²I): q_t = N(√ᾱ mean, v I), v = ᾱs² + 1 − ᾱ;
    score −(x − √ᾱ mean)/v, ε* = σ(x − √ᾱ mean)/v (paper-notes §6), x̂₀ = mean + s²√ᾱ(x − √ᾱ mean)/v."""

    def __init__(self, schedule, mean, s2, prediction="score"):
        super().__init__()
        self.schedule, self.s2, self.prediction = schedule, s2, prediction
        self.mean = nn.Parameter(f64(mean))

    def forward(self, x, t):
        ab = col(self.schedule.alpha_bar(t), x)
        v = ab * self.s2 + 1 - ab
        r = x - ab.sqrt() * self.mean
        return {"score": -r / v, "epsilon": (1 - ab).sqrt() * r / v, "x0": self.mean + self.s2 * ab.sqrt() * r / v}[
            self.prediction
        ]


# ---------------------------------------------------------------------------------------------
# Exact: each step against a hand-written formula (fixed noise, per-sample m)
# ---------------------------------------------------------------------------------------------


def parts(model, y, s, sch, prediction):
    """(ᾱ, σ, ε̂, score, x̂₀) at times s (B,) from the model's prediction, written out by hand."""
    ab = col(sch.alpha_bar(s), y)
    sig = (1 - ab).sqrt()
    out = model(y, s)
    eps = {"epsilon": out, "score": -sig * out, "x0": (y - ab.sqrt() * out) / sig}[prediction]
    return ab, sig, eps, -eps / sig, (y - sig * eps) / ab.sqrt()


def expected_step(name, x, model, m, sch, z, prediction):
    """The update equations of the docstrings, written out with the schedule's ᾱ and β."""
    times = sch.times
    t, tn = times[m], times[m + 1]
    h = col(t - tn, x)
    ab, sig, eps, score, x0 = parts(model, x, t, sch, prediction)
    b, bn = col(sch.beta(t), x), col(sch.beta(tn), x)
    abn = col(sch.alpha_bar(tn), x)
    if name == "euler-maruyama":
        return x + h * (0.5 * b * x + b * score) + (b * h).sqrt() * z
    if name == "pf-euler":
        return x + h * 0.5 * b * (x + score)
    if name == "pf-heun":
        d1 = 0.5 * b * (x + score)
        xt = x + h * d1
        d2 = 0.5 * bn * (xt + parts(model, xt, tn, sch, prediction)[3])
        return x + h / 2 * (d1 + d2)
    if name == "ddpm":
        alpha = ab / abn
        beta_m = 1 - alpha
        return (x - beta_m / sig * eps) / alpha.sqrt() + (beta_m * (1 - abn) / (1 - ab)).sqrt() * z
    assert name == "ddim"
    return abn.sqrt() * x0 + (1 - abn).sqrt() * eps


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", STEPS)
def test_step_matches_formula_with_fixed_noise(name, prediction, kind, generator):
    """Per-sample m spanning the grid (first and last step included); event shape (2, 3)."""
    sch = VPSchedule(kind, num_steps=6)
    net = TinyNet(event=(2, 3))
    x, z = randn64(generator, 6, 2, 3), randn64(generator, 6, 2, 3)
    m = torch.tensor([0, 5, 2, 3, 1, 4])
    out = DIFFUSION_STEPS[name](x, net, m, schedule=sch, noise=z, prediction=prediction)
    assert_close64(out, expected_step(name, x, net, m, sch, z, prediction))
    for i in (0, 5):  # an int m gives the same as a constant per-sample m
        out_int = DIFFUSION_STEPS[name](x, net, i, schedule=sch, noise=z, prediction=prediction)
        assert_close64(out_int, expected_step(name, x, net, torch.full((6,), i), sch, z, prediction))


@pytest.mark.parametrize("name", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_mixed_step_indices_equal_separate_calls(name, prediction, generator):
    """The queue's batched call: one call with m = (m_1, …, m_B) equals the concatenation of B
    single-sample calls with int m_i (and of calls grouped by equal m)."""
    sch = VPSchedule("linear", num_steps=5)
    net = TinyNet()
    x, z = randn64(generator, 7, 2), randn64(generator, 7, 2)
    m = torch.tensor([4, 0, 2, 2, 1, 3, 0])
    step = DIFFUSION_STEPS[name]
    batched = step(x, net, m, schedule=sch, noise=z, prediction=prediction)
    separate = torch.cat(
        [step(x[i : i + 1], net, int(m[i]), schedule=sch, noise=z[i : i + 1], prediction=prediction) for i in range(7)]
    )
    assert_close64(batched, separate)
    for v in m.unique():
        sel = m == v
        assert_close64(batched[sel], step(x[sel], net, int(v), schedule=sch, noise=z[sel], prediction=prediction))


def test_model_receives_per_sample_times_in_x_dtype():
    sch = VPSchedule("cosine", num_steps=4)
    seen = []

    def model(x, t):
        seen.append(t)
        return -x

    for dtype in (torch.float32, torch.float64):
        seen.clear()
        x = torch.zeros(3, 2, dtype=dtype)
        probability_flow_heun_step(x, model, torch.tensor([0, 3, 1]), schedule=sch)
        assert [s.shape for s in seen] == [(3,), (3,)] and all(s.dtype == dtype for s in seen)
        torch.testing.assert_close(seen[0], sch.times[[0, 3, 1]].to(dtype))
        torch.testing.assert_close(seen[1], sch.times[[1, 4, 2]].to(dtype))


# ---------------------------------------------------------------------------------------------
# Gaussian data N(mean, s²I) with the exact predictor: every step is affine + Gaussian
# ---------------------------------------------------------------------------------------------

MEAN, S2 = [1.5, -0.5], 0.25


def affine_coefficients(name, sch, m):
    """(a, k, q) with x_{m+1} = a x + k·mean + √q z for the exact predictor (floats, float64 maths).

    With v = ᾱs² + 1 − ᾱ, e(t) = ½β(1 − 1/v), f(t) = ½β√ᾱ/v (so ½β(x + s) = e x + f·mean):
    EM: a = 1 + ½βh − βh/v, k = βh√ᾱ/v, q = βh.  PF-Euler: a = 1 + h e, k = h f, q = 0.
    Heun: a = 1 + (h/2)(e + eₙ(1 + h e)), k = (h/2)(f + eₙ h f + fₙ), q = 0.
    DDPM: a = (1 − β_m/v)/√α_m, k = β_m√ᾱ/(v√α_m), q = β_m(1 − ᾱₙ)/(1 − ᾱ).
    DDIM: a = (√ᾱₙ s²√ᾱ + σₙσ)/v, k = (√ᾱₙσ² − σₙσ√ᾱ)/v, q = 0.
    """
    t, tn = sch.times[m], sch.times[m + 1]
    h = float(t - tn)
    ab, abn = float(sch.alpha_bar(t)), float(sch.alpha_bar(tn))
    b, bn = float(sch.beta(t)), float(sch.beta(tn))
    v, vn = ab * S2 + 1 - ab, abn * S2 + 1 - abn
    sig, sign = math.sqrt(1 - ab), math.sqrt(1 - abn)
    e, f = 0.5 * b * (1 - 1 / v), 0.5 * b * math.sqrt(ab) / v
    en, fn = 0.5 * bn * (1 - 1 / vn), 0.5 * bn * math.sqrt(abn) / vn
    if name == "euler-maruyama":
        return 1 + 0.5 * b * h - b * h / v, b * h * math.sqrt(ab) / v, b * h
    if name == "pf-euler":
        return 1 + h * e, h * f, 0.0
    if name == "pf-heun":
        return 1 + h / 2 * (e + en * (1 + h * e)), h / 2 * (f + en * h * f + fn), 0.0
    if name == "ddpm":
        alpha = ab / abn
        beta_m = 1 - alpha
        a = (1 - beta_m / v) / math.sqrt(alpha)
        return a, beta_m * math.sqrt(ab) / (v * math.sqrt(alpha)), beta_m * (1 - abn) / (1 - ab)
    assert name == "ddim"
    a = (math.sqrt(abn) * S2 * math.sqrt(ab) + sign * sig) / v
    return a, (math.sqrt(abn) * sig**2 - sign * sig * math.sqrt(ab)) / v, 0.0


def exact_law(name, sch, mu0=0.0, var0=1.0):
    """Law after all M steps from N(mu0, var0 I): μ ← aμ + k·mean, V ← a²V + q (per coordinate)."""
    mu, var = torch.full((2,), mu0, dtype=torch.float64), var0
    for m in range(sch.num_steps):
        a, k, q = affine_coefficients(name, sch, m)
        mu, var = a * mu + k * f64(MEAN), a * a * var + q
    return mu, var


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", STEPS)
def test_gaussian_data_step_is_affine_gaussian(name, prediction, kind, generator):
    """Conditional mean a x + k·mean and noise term √q z, exactly, at every step m; and the closed-form
    gradients ∂Σx_{m+1}/∂x = a, ∂Σx_{m+1}/∂mean = B·k (each coordinate)."""
    sch = VPSchedule(kind, num_steps=5)
    model = GaussianDataModel(sch, MEAN, S2, prediction)
    for m in range(5):
        a, k, q = affine_coefficients(name, sch, m)
        x = (randn64(generator, 4, 2) * 2).requires_grad_(True)
        z = randn64(generator, 4, 2)
        out = DIFFUSION_STEPS[name](x, model, m, schedule=sch, noise=z, prediction=prediction)
        assert_close64(out.detach(), a * x.detach() + k * f64(MEAN) + math.sqrt(q) * z)
        gx, gmean = torch.autograd.grad(out.sum(), [x, model.mean])
        assert_close64(gx, torch.full((4, 2), a, dtype=torch.float64))
        assert_close64(gmean, torch.full((2,), 4 * k, dtype=torch.float64))


N_CHAINS = 20_000


def matches_law(x, mu, var, z=Z) -> bool:
    """Each coordinate: mean within z·√V/√n and variance within z·V√(2/(n−1)) of N(μ, V). The chains are
    i.i.d. and the law after M affine-Gaussian steps from a Gaussian start is exactly Gaussian."""
    return all(mean_within(x[:, j], float(mu[j]), math.sqrt(var), z) and var_within(x[:, j], var, z) for j in range(2))


def ddpm_wrong_std(x, model, m, *, schedule, generator=None, noise=None, prediction="score"):
    """Negative control: posterior std σ̃ multiplied by √2."""
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return ddpm_step(x, model, m, schedule=schedule, noise=math.sqrt(2) * z, prediction=prediction)


def ddpm_wrong_sign(x, model, m, *, schedule, generator=None, noise=None, prediction="score"):
    """Negative control: +β_m/σ·ε̂ instead of −β_m/σ·ε̂ (the ε-prediction's sign flipped)."""
    return ddpm_step(x, lambda y, t: -model(y, t), m, schedule=schedule, generator=generator, prediction=prediction)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("step", [ddpm_step, ddpm_wrong_std, ddpm_wrong_sign], ids=["ddpm", "wrong-std", "wrong-sign"])
def test_ddpm_gaussian_data_final_law(step, kind, generator):
    """`sample(ddpm_step)` with the exact ε* (M = 20) from 20,000 i.i.d. N(0, I) draws in d = 2: the final
    mean and variance within 5 SE of the exact recursion (`exact_law`): mean tolerance 5√V/√n ≈ 0.035√V,
    variance 5V√(2/n) ≈ 0.05V. DDPM's mean is exactly the continuous reverse SDE's (`sde_target`,
    ≈ (1.5, −0.5)); its variance is not (the ancestral step drops Var(x₀|x_t)): V ≈ 0.15 (linear),
    0.19 (cosine), 0.06 (ou, T = 5 in 20 steps), against s² = 0.25.
    Negative controls: σ̃·√2 doubles V (100 SE off); the flipped ε sign makes the chain diverge (V ~ 1e10)."""
    sch = VPSchedule(kind, num_steps=20)
    model = GaussianDataModel(sch, MEAN, S2, "epsilon")
    x0 = randn64(generator, N_CHAINS, 2)
    with torch.no_grad():
        x = sample(step, model, x0, schedule=sch, generator=generator, prediction="epsilon")
    mu, var = exact_law("ddpm", sch)
    assert_close64(mu, sde_target(sch)[0])  # the reverse SDE's exact mean, whatever M
    assert matches_law(x, mu, var) == (step is ddpm_step)


def em_wrong_noise(x, model, m, *, schedule, generator=None, noise=None, prediction="score"):
    """Negative control: noise √h z instead of √(β h) z (with β ≡ 2: the Langevin √γ-vs-√(2γ) slip)."""
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    scale = 1 / math.sqrt(float(schedule.beta(schedule.times[m])))  # √h = √(βh)/√β
    return euler_maruyama_step(x, model, m, schedule=schedule, noise=scale * z, prediction=prediction)


def sde_target(sch):
    """Law at t_min of the exact reverse SDE started from N(0, 1) at T (per coordinate): the exact
    score makes its transitions the forward process's conditionals, x_min | x_T ~ N(μ_min + c(y − μ_T)/v_T,
    v_min − c²/v_T), c = Cov(x_min, x_T) = √(ᾱ_T/ᾱ_min) v_min; averaging over y ~ N(0, 1)."""
    ab_T, ab_min = sch.alpha_bar(sch.times[0]), sch.alpha_bar(sch.times[-1])
    v_T, v_min = ab_T * S2 + 1 - ab_T, ab_min * S2 + 1 - ab_min
    c = (ab_T / ab_min).sqrt() * v_min
    mu = ab_min.sqrt() * f64(MEAN) - c / v_T * ab_T.sqrt() * f64(MEAN)
    return mu, float(v_min - c**2 / v_T + (c / v_T) ** 2)


@pytest.mark.parametrize("kind", KINDS)
def test_euler_maruyama_bias_is_first_order(kind):
    """Exact (float64): the EM law's bias to the continuous reverse SDE's law (`sde_target`, ≈ N(mean, s²))
    halves from M = 40 to 80: ratio of the (mean, variance) errors in [1.7, 2.5] (measured 1.99–2.21)."""
    errors = []
    for M in (40, 80):
        sch = VPSchedule(kind, num_steps=M)
        (mu, var), (mu_t, var_t) = exact_law("euler-maruyama", sch), sde_target(sch)
        errors.append((float((mu - mu_t).abs().max()), abs(var - var_t)))
    for e_m, e_2m in zip(*errors):
        assert 1.7 <= e_m / e_2m <= 2.5


@pytest.mark.parametrize("step", [euler_maruyama_step, em_wrong_noise], ids=["em", "wrong-noise"])
def test_euler_maruyama_gaussian_data_final_law(step, generator):
    """OU schedule (T = 5), exact score, 20,000 i.i.d. chains from N(0, I), M = 20 and 40. (a) Final mean and
    variance within 5 SE of the exact EM law (`exact_law`, which carries the O(h) bias): V ≈ 0.59 and 0.40
    against the continuous SDE's 0.2515. (b) The sample variance bias to the continuous law, b̂_M, halves:
    b_20 ≈ 0.337, b_40 ≈ 0.148, SE ≤ V√(2/n) ≈ 0.006 and 0.004, so at 5 SE b̂_20/b̂_40 ∈ [1.8, 2.9]; asserted in
    [1.5, 3.5]. Negative control (noise √h, not √(2h)): V ≈ 0.29 and 0.20, ≳ 50 SE off: (a) fails."""
    biases, ok = [], True
    for M in (20, 40):
        sch = VPSchedule("ou", num_steps=M)
        model = GaussianDataModel(sch, MEAN, S2, "score")
        with torch.no_grad():
            x = sample(step, model, randn64(generator, N_CHAINS, 2), schedule=sch, generator=generator)
        mu, var = exact_law("euler-maruyama", sch)
        ok &= matches_law(x, mu, var)
        biases.append(float(x.var(dim=0).mean()) - sde_target(sch)[1])
    assert ok == (step is euler_maruyama_step)
    if step is euler_maruyama_step:
        assert 1.5 <= biases[0] / biases[1] <= 3.5


def affine_map(name, sch, prediction="score"):
    """(C, A) with sample(step)(x) = A x + C for the exact predictor, checked to be affine; the law of the
    output from N(0, I) is then exactly N(C, A²I): no Monte Carlo needed for deterministic samplers."""
    model = GaussianDataModel(sch, MEAN, S2, prediction)
    x = f64([[0.0, 0.0], [1.0, 1.0], [-2.5, 0.7]])
    with torch.no_grad():
        y = sample(DIFFUSION_STEPS[name], model, x, schedule=sch, prediction=prediction)
    C, A = y[0], float(y[1, 0] - y[0, 0])
    assert_close64(y, A * x + C)
    return C, A


def flow_target(sch):
    """The exact probability-flow map from T to t_min for Gaussian data is x ↦ μ_min + √(v_min/v_T)(x − μ_T);
    from N(0, I): N(μ_min − √(v_min/v_T) μ_T, v_min/v_T)."""
    ab_T, ab_min = sch.alpha_bar(sch.times[0]), sch.alpha_bar(sch.times[-1])
    v_T, v_min = ab_T * S2 + 1 - ab_T, ab_min * S2 + 1 - ab_min
    A = (v_min / v_T).sqrt()
    return ab_min.sqrt() * f64(MEAN) - A * ab_T.sqrt() * f64(MEAN), float(A**2)


@pytest.mark.parametrize(
    "name,kind,M,lo,hi",
    [
        ("ddim", "linear", 100, 1.7, 2.3),
        ("ddim", "cosine", 100, 1.7, 2.3),
        ("ddim", "ou", 160, 1.6, 2.3),
        ("pf-euler", "linear", 100, 1.7, 2.3),
        ("pf-euler", "ou", 100, 1.7, 2.3),
        ("pf-heun", "linear", 80, 3.5, 4.5),
        ("pf-heun", "ou", 80, 3.5, 4.5),
    ],
)
def test_deterministic_samplers_convergence_order(name, kind, M, lo, hi):
    """Exact (float64): the error e_M of the output law N(C, A²) to the exact flow's (`flow_target`) shrinks
    by 2^p from M to 2M: p = 1 (DDIM, PF-Euler; measured ratios 1.76–2.04), p = 2 (Heun, 3.95–4.17). The
    uniform grid resolves OU's σ(t) ≈ √(2t) near 0 slowly, so OU's DDIM ratio is still 1.8 at M = 160.
    Heun on "cosine" is left out: β's kink at the clip time spoils the clean h² of the mean's (tiny) error."""
    errors = []
    for steps in (M, 2 * M):
        sch = VPSchedule(kind, num_steps=steps)
        (C, A), (mu_t, var_t) = affine_map(name, sch), flow_target(sch)
        errors.append(float((C - mu_t).abs().max()) + abs(A * A - var_t))
    assert lo <= errors[0] / errors[1] <= hi


@pytest.mark.parametrize("kind,var_tol", [("linear", 0.05), ("cosine", 0.05), ("ou", 0.2)])
def test_ddim_maps_standard_normal_near_the_data_law(kind, var_tol):
    """DDIM (x̂₀-prediction, M = 200) maps N(0, I) at T to N(C, A²I), exactly: C and A from the affine map
    equal the recursion of `affine_coefficients`. Near N(mean, s²): (i) the mean within √ᾱ(T)|mean| + 1e-3
    (the prior mismatch — at T the data's marginal is N(√ᾱ(T)·mean, v_T), not N(0, 1); √ᾱ(T) ≈ 0.0067 for
    "linear" and "ou", 0.057 for "cosine" — plus the discretisation error, measured ≤ 4.3e-4); (ii) the
    variance within var_tol·s²: DDIM's first-order error ≈ c/M with c ≈ 1.4 s² (linear), 0.8 s² (cosine) and
    8 s² (ou, whose uniform grid resolves σ(t) ≈ √(2t) near t_min poorly): measured 2.8%, 1.5%, 16% at M = 200."""
    sch = VPSchedule(kind, num_steps=200)
    C, A = affine_map("ddim", sch, prediction="x0")
    mu, var = exact_law("ddim", sch)
    assert_close64(C, mu)
    assert_close64(f64(A * A), f64(var))
    prior_mismatch = float(sch.alpha_bar(sch.times[0]).sqrt()) * f64(MEAN).abs()
    assert bool(((C - f64(MEAN)).abs() <= prior_mismatch + 1e-3).all())
    assert abs(A * A - S2) <= var_tol * S2


# ---------------------------------------------------------------------------------------------
# t_min = 0: the last step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_last_step_to_t_zero(prediction, generator):
    """t_min = 0: Heun's last step is the Euler step (σ = 0 there) and stays finite with finite gradients;
    DDPM's posterior variance is 0 (noise has no effect); DDIM returns x̂₀."""
    sch = VPSchedule("linear", num_steps=4, t_min=0.0)
    net = TinyNet()
    x, z = randn64(generator, 5, 2).requires_grad_(True), randn64(generator, 5, 2)
    heun = probability_flow_heun_step(x, net, 3, schedule=sch, prediction=prediction)
    assert_close64(heun, probability_flow_euler_step(x, net, 3, schedule=sch, prediction=prediction))
    grads = torch.autograd.grad(heun.sum(), [x, *net.parameters()])
    assert all(torch.isfinite(g).all() for g in grads)
    m = torch.tensor([3, 0, 3, 1, 2])  # mixed: only the samples at the last step fall back to Euler
    mixed = probability_flow_heun_step(x, net, m, schedule=sch, prediction=prediction)
    assert_close64(mixed[[0, 2]], heun[[0, 2]])
    assert_close64(mixed[[1, 3, 4]], expected_step("pf-heun", x[[1, 3, 4]], net, m[[1, 3, 4]], sch, None, prediction))
    ddpm = [ddpm_step(x, net, 3, schedule=sch, noise=n, prediction=prediction) for n in (z, torch.zeros_like(z))]
    assert_close64(ddpm[0], ddpm[1])
    x0_hat = parts(net, x, sch.times[[3] * 5], sch, prediction)[4]
    assert_close64(ddim_step(x, net, 3, schedule=sch, prediction=prediction), x0_hat)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", STEPS)
def test_gradients_match_finite_differences(name, prediction, generator):
    """Noise fixed, L = ⟨u, step(x, θ)⟩: every parameter and x get a nonzero gradient, and autograd's
    directional derivatives along random δθ, δx equal central differences (ε = 1e-6, float64: error
    O(ε²) ≈ 1e-12 plus rounding ≈ 1e-16/ε = 1e-10; tolerance 1e-7 relative + 1e-9)."""
    sch = VPSchedule("cosine", num_steps=5)
    net = TinyNet()
    x, z, u = randn64(generator, 4, 2), randn64(generator, 4, 2), randn64(generator, 4, 2)
    m = torch.tensor([0, 2, 4, 1])
    step = DIFFUSION_STEPS[name]

    def loss(x_):
        return (step(x_, net, m, schedule=sch, noise=z, prediction=prediction) * u).sum()

    xr = x.clone().requires_grad_(True)
    params = list(net.parameters())
    grads = torch.autograd.grad(loss(xr), [xr, *params])
    assert all(g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)
    eps = 1e-6
    dx = randn64(generator, 4, 2)
    dps = [randn64(generator, *p.shape) for p in params]
    with torch.no_grad():
        fd_x = (loss(x + eps * dx) - loss(x - eps * dx)) / (2 * eps)
        originals = [p.clone() for p in params]
        values = []
        for sign in (1, -1):
            for p, p0, d in zip(params, originals, dps):
                p.copy_(p0 + sign * eps * d)
            values.append(loss(x))
        for p, p0 in zip(params, originals):
            p.copy_(p0)
        fd_p = (values[0] - values[1]) / (2 * eps)
    torch.testing.assert_close((grads[0] * dx).sum(), fd_x, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(sum((g * d).sum() for g, d in zip(grads[1:], dps)), fd_p, rtol=1e-7, atol=1e-9)


def test_sample_is_differentiable_end_to_end(generator):
    """Grad mode on: ∂x_M/∂mean through all M DDIM steps is the product of the per-step closed forms
    (Σ_m k_m Π_{j>m} a_j per coordinate, summed over the batch)."""
    sch = VPSchedule("linear", num_steps=8)
    model = GaussianDataModel(sch, MEAN, S2, "epsilon")
    x = sample(ddim_step, model, randn64(generator, 3, 2), schedule=sch, prediction="epsilon")
    (g,) = torch.autograd.grad(x.sum(), model.mean)
    total = 0.0
    for m in range(8):
        prod = math.prod(affine_coefficients("ddim", sch, j)[0] for j in range(m + 1, 8))
        total += affine_coefficients("ddim", sch, m)[1] * prod
    assert_close64(g, torch.full((2,), 3 * total, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# RNG discipline, determinism, invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STEPS)
def test_rng_discipline(name, generator):
    """Stochastic steps need noise or a generator (never the global RNG); deterministic steps ignore both
    and leave the generator's state alone; nothing touches the global RNG."""
    sch = VPSchedule("ou", num_steps=3)
    step, net = DIFFUSION_STEPS[name], TinyNet()
    x = randn64(generator, 4, 2)
    state = torch.get_rng_state()
    if name in STOCHASTIC:
        with pytest.raises(ValueError, match="generator=torch.Generator"):
            step(x, net, 0, schedule=sch)
        outs = [step(x, net, 1, schedule=sch, noise=randn64(generator, 4, 2)) for _ in range(2)]
        assert not torch.equal(outs[0], outs[1])
        step(x, net, 1, schedule=sch, generator=generator)
    else:
        g_state = generator.get_state()
        outs = [
            step(x, net, 1, schedule=sch),
            step(x, net, 1, schedule=sch, noise=randn64(torch.Generator().manual_seed(1), 4, 2)),
            step(x, net, 1, schedule=sch, generator=generator),
        ]
        assert torch.equal(generator.get_state(), g_state)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("name", STEPS)
def test_sample_same_seed_bit_identical_and_trajectory(name):
    sch = VPSchedule("cosine", num_steps=6)
    net = TinyNet()
    x_init = torch.randn(50, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    runs = []
    for seed in (42, 42, 43):
        with torch.no_grad():
            runs.append(sample(DIFFUSION_STEPS[name], net, x_init, schedule=sch,
                               generator=torch.Generator().manual_seed(seed), return_trajectory=True))
    assert len(runs[0]) == 7 and runs[0][0] is x_init
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert torch.equal(runs[0][-1], runs[2][-1]) == (name not in STOCHASTIC)
    noises = torch.randn(6, 50, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        traj = sample(DIFFUSION_STEPS[name], net, x_init, schedule=sch, noises=noises, return_trajectory=True)
        x = x_init
        for m in range(6):
            x = DIFFUSION_STEPS[name](x, net, m, schedule=sch, noise=noises[m])
            assert torch.equal(traj[m + 1], x)
        assert torch.equal(sample(DIFFUSION_STEPS[name], net, x_init, schedule=sch, noises=noises), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", STEPS)
def test_steps_preserve_shape_dtype_and_inputs(name, grad_mode, dtype, generator):
    sch = VPSchedule("linear", num_steps=4)
    net = TinyNet(event=(2, 3)).to(dtype)
    x = torch.randn(5, 2, 3, generator=generator, dtype=dtype)
    z = torch.randn(5, 2, 3, generator=generator, dtype=dtype)
    m = torch.tensor([0, 1, 2, 3, 0])
    x_copy, z_copy, m_copy = x.clone(), z.clone(), m.clone()
    with torch.set_grad_enabled(grad_mode):
        outs = [DIFFUSION_STEPS[name](x, net, mm, schedule=sch, noise=z, prediction="epsilon") for mm in (m, 2)]
    for out in outs:
        assert out.shape == x.shape and out.dtype == dtype and out is not x
        assert bool(torch.isfinite(out).all())
        assert out.requires_grad == grad_mode
    assert torch.equal(x, x_copy) and torch.equal(z, z_copy) and torch.equal(m, m_copy)


def test_diffusion_steps_registry():
    assert DIFFUSION_STEPS == {
        "euler-maruyama": euler_maruyama_step,
        "pf-euler": probability_flow_euler_step,
        "pf-heun": probability_flow_heun_step,
        "ddpm": ddpm_step,
        "ddim": ddim_step,
    }


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STEPS)
def test_step_errors(name):
    sch = VPSchedule("ou", num_steps=4)
    step = DIFFUSION_STEPS[name]
    x, z = torch.zeros(3, 2), torch.zeros(3, 2)

    def call(m=0, model=lambda x, t: -x, **kw):
        kw.setdefault("noise", z)
        return step(x, model, m, schedule=sch, **kw)

    for bad in (-1, 4, 1.0, True, torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"step index m must be an integer in \[0, 4\)"):
            call(bad)
    with pytest.raises(ValueError, match=r"step indices m must lie in \[0, 4\), got values in \[0, 4\]"):
        call(torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(3,\), got torch.int64 of shape \(2,\)"):
        call(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(3,\), got torch.float32"):
        call(torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"m must be an int or an integer tensor"):
        call("first")
    with pytest.raises(ValueError, match=r"model <lambda> \(x, t\) must return a tensor of x's shape "
                                         r"\(3, 2\), got \(3,\)"):
        call(model=lambda x, t: x.sum(1))
    with pytest.raises(ValueError, match=r"unknown prediction 'v'; allowed: score, epsilon, x0"):
        call(prediction="v")
    if name in STOCHASTIC:
        with pytest.raises(ValueError, match=r"noise must have the particles' shape \(3, 2\), got \(3, 1\)"):
            call(noise=torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"noises must have shape \(num_steps, \*x_init.shape\) = \(4, 3, 2\)"):
        sample(step, lambda x, t: -x, x, schedule=sch, noises=torch.zeros(3, 3, 2))
