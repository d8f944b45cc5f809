"""Gradients through finite-horizon sampling (objectives/adjoint.py, objectives/girsanov.py).

Gradient tests, float64, noise held fixed (the path is a deterministic function of
(x_0, ξ, θ)): the adjoint sweep == autograd through the unrolled sampler (rel 1e-10) ==
central finite differences (tolerance derived in ``test_matches_finite_differences``), with
negative controls that break the equality. Invariants: store="states" and store="noise" are
bit-identical, every parameter gets its gradient in ``.grad``, no step's graph outlives the
step. Girsanov: 0 at θ = θ₀, the per-step constant checked against the exact Gaussian
transition KL, and the 1-D linear-Gaussian closed form (θ − θ₀)²(1 − e^{−2T})/2.

The sampler steps here are small test doubles following the shared step signature
``step(x, model, m, *, schedule, generator=None, noise=None, prediction=...)``.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import NamedTuple

import pytest
import torch
from conftest import assert_close64, f64

from implicit_diffusion.objectives.adjoint import (
    Trajectory,
    adjoint_backward,
    adjoint_surrogate,
    adjoint_through_sampler,
    autograd_through_sampler,
    sample_with_trajectory,
    terminal_reward_gradient,
)
from implicit_diffusion.objectives.girsanov import DiscreteMeanKL, GirsanovKL

B, D, M = 4, 2, 5
LAMBDA, BETA = 1.3, 0.7
TARGET = f64([1.0, -0.5])


class Schedule(NamedTuple):
    times: torch.Tensor  # (M+1,), decreasing forward-process times


def times_at(schedule, m, x):
    return torch.full((x.shape[0],), float(schedule.times[m]), dtype=x.dtype)


def em_step(x, model, m, *, schedule, generator=None, noise=None, prediction="score"):
    """Reverse-SDE Euler–Maruyama, OU convention: y + h(y + 2 s(y, t_m)) + √(2h) z."""
    h = float(schedule.times[m] - schedule.times[m + 1])
    return x + h * (x + 2 * model(x, times_at(schedule, m, x))) + math.sqrt(2 * h) * noise


class VPLikeSchedule(NamedTuple):
    """A variance-preserving schedule with noise rate β(t) = 0.5 + t (as samplers.schedules.VPSchedule has)."""

    times: torch.Tensor

    def beta(self, t):
        return 0.5 + torch.as_tensor(t, dtype=torch.float64)  # never 2 (OU) on the grid


def vp_em_step(x, model, m, *, schedule, generator=None, noise=None, prediction="score"):
    """VP reverse-SDE Euler–Maruyama: y + h(½β y + β s(y, t_m)) + √(βh) z, β = β(t_m)."""
    h, beta = float(schedule.times[m] - schedule.times[m + 1]), float(schedule.beta(schedule.times[m]))
    return x + h * (0.5 * beta * x + beta * model(x, times_at(schedule, m, x))) + math.sqrt(beta * h) * noise


def ode_step(x, model, m, *, schedule, generator=None, noise=None, prediction="score"):
    """Probability-flow ODE, Euler: y + h(y + s(y, t_m)); deterministic (noise unused)."""
    h = float(schedule.times[m] - schedule.times[m + 1])
    return x + h * (x + model(x, times_at(schedule, m, x)))


def alpha_bar(t):
    return math.exp(-2.0 * float(t))  # the OU forward process: x_t = e^{−t}x_0 + √(1−e^{−2t}) n


def ddpm_noise_std(schedule, m):
    ab, ab_next = alpha_bar(schedule.times[m]), alpha_bar(schedule.times[m + 1])
    beta = 1 - ab / ab_next
    return math.sqrt(beta * (1 - ab_next) / (1 - ab))


def ddpm_step(x, model, m, *, schedule, generator=None, noise=None, prediction="eps"):
    """DDPM ancestral step with an ε-predicting model; returns (x_next, info) like the Langevin steps."""
    ab, ab_next = alpha_bar(schedule.times[m]), alpha_bar(schedule.times[m + 1])
    alpha = ab / ab_next
    eps = model(x, times_at(schedule, m, x))
    mean = (x - (1 - alpha) / math.sqrt(1 - ab) * eps) / math.sqrt(alpha)
    return mean + ddpm_noise_std(schedule, m) * noise, None


STEPS = {"em": em_step, "ode": ode_step, "ddpm": ddpm_step}


class TinyNet(torch.nn.Module):
    """Two-layer tanh MLP on (x, t), float64, weights drawn from an explicit generator."""

    def __init__(self, generator, dim=D, hidden=6):
        super().__init__()

        def draw(*shape, scale):
            return torch.nn.Parameter(scale * torch.randn(*shape, generator=generator, dtype=torch.float64))

        self.w1, self.b1 = draw(hidden, dim + 1, scale=0.7), draw(hidden, scale=0.3)
        self.w2, self.b2 = draw(dim, hidden, scale=0.5), draw(dim, scale=0.3)

    def forward(self, x, t):
        h = torch.tanh(torch.cat([x, t[:, None]], dim=1) @ self.w1.T + self.b1)
        return -x + h @ self.w2.T + self.b2


class LinearScore(torch.nn.Module):
    """s_θ(x, t) = −(x − θe^{−t}): the exact score of the OU marginals of N(θ, 1) data (1-D)."""

    def __init__(self, theta):
        super().__init__()
        self.theta = torch.nn.Parameter(f64(theta))

    def forward(self, x, t):
        return -(x - self.theta * torch.exp(-t)[:, None])


def smooth_reward(x):
    return -((x - TARGET) ** 2).sum(1) + torch.sin(2 * x[:, 0])


def perturb(model, generator, scale=0.3):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


class Problem(NamedTuple):
    step: object
    model: torch.nn.Module
    x0: torch.Tensor
    noises: torch.Tensor | None
    schedule: Schedule
    cost: object


def make_problem(name, generator, with_cost=True) -> Problem:
    schedule = Schedule(torch.linspace(1.0, 0.05, M + 1, dtype=torch.float64))
    model = TinyNet(generator)
    x0 = torch.randn(B, D, generator=generator, dtype=torch.float64)
    noises = None if name == "ode" else torch.randn(M, B, D, generator=generator, dtype=torch.float64)
    cost = None
    if with_cost:
        if name == "ddpm":
            sigmas = [ddpm_noise_std(schedule, m) for m in range(M)]
            cost = DiscreteMeanKL(ddpm_step, model, sigmas, BETA, schedule=schedule)
        else:
            cost = GirsanovKL(model, schedule, BETA, prediction="score")
        perturb(model, generator)  # θ ≠ θ₀, else the KL term and its gradients vanish
    return Problem(STEPS[name], model, x0, noises, schedule, cost)


def run(fn, pb: Problem, cost="default", **kwargs):
    """Gradients of −λ mean R(x_M) + Σ c_m: (SamplerGradInfo, [p.grad]) with .grad reset first."""
    for p in pb.model.parameters():
        p.grad = None
    info = fn(
        pb.step, pb.model, pb.x0, pb.noises, smooth_reward, schedule=pb.schedule, weight=LAMBDA,
        running_cost=pb.cost if cost == "default" else cost, num_steps=M, **kwargs,
    )  # fmt: skip
    return info, [p.grad.clone() for p in pb.model.parameters()]


def loss_value(pb: Problem) -> float:
    """−λ mean R(x_M) + Σ_m c_m(x_m), by a plain forward loop (for finite differences)."""
    with torch.no_grad():
        x, total = pb.x0, 0.0
        for m in range(M):
            if pb.cost is not None:
                total += float(pb.cost(x, m))
            out = pb.step(x, pb.model, m, schedule=pb.schedule, noise=None if pb.noises is None else pb.noises[m])
            x = out[0] if isinstance(out, tuple) else out
        return total - LAMBDA * float(smooth_reward(x).mean())


# ---------------------------------------------------------------------------------------------
# Adjoint == autograd == finite differences
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["states", "noise"])
@pytest.mark.parametrize("with_cost", [False, True], ids=["reward", "reward+kl"])
@pytest.mark.parametrize("name", ["em", "ddpm", "ode"])
def test_adjoint_equals_autograd(name, with_cost, store, generator):
    pb = make_problem(name, generator, with_cost)
    ref, g_ref = run(autograd_through_sampler, pb)
    adj, g_adj = run(adjoint_through_sampler, pb, store=store, checkpoint_every=2 if store == "noise" else None)
    for a, r in zip(g_adj, g_ref):
        assert_close64(a, r)
    for field in ("grad_x_init", "x_final", "loss", "reward", "running_cost"):
        assert_close64(getattr(adj, field), getattr(ref, field))
    assert (float(ref.running_cost) > 0) == with_cost


@pytest.mark.parametrize("name", ["em", "ddpm"])
def test_matches_finite_differences(name, generator):
    """Central differences (L(θ + he) − L(θ − he))/2h, h = 1e-5, on a few entries of θ and x_0.

    Error ≤ h²|L'''|/6 (truncation, ≈ 2e-11·|L'''|) + ~ε|L|/h (rounding of the two evaluations,
    ε = 2.2e-16): ≈ 1e-10 for |L| ≈ 10 (em) and ≈ 2e-8 for |L| ≈ 900 (ddpm), as measured.
    Tolerance 50·ε|L|/h + 1e-8 (the 1e-8 covers |L'''| up to ~100): a 40–100× margin, while the
    negative controls below are off by > 1e-4 relative.
    """
    pb = make_problem(name, generator)
    info, grads = run(adjoint_through_sampler, pb)
    h = 1e-5
    names = [n for n, _ in pb.model.named_parameters()]
    exact = {n: g for n, g in zip(names, grads)} | {"x0": info.grad_x_init}
    tensors = dict(pb.model.named_parameters()) | {"x0": pb.x0}
    for name_, idx in [("w1", (0, 0)), ("w1", (3, 2)), ("b2", (1,)), ("x0", (2, 1))]:
        tensor = tensors[name_]
        with torch.no_grad():
            old = tensor[idx].item()
            tensor[idx] = old + h
            up = loss_value(pb)
            tensor[idx] = old - h
            down = loss_value(pb)
            tensor[idx] = old
        fd = (up - down) / (2 * h)
        tol = 50 * 2.2e-16 * abs(float(info.loss)) / h + 1e-8
        assert abs(fd - float(exact[name_][idx])) <= tol
    assert float(info.loss) == pytest.approx(loss_value(pb), rel=1e-12)


@pytest.mark.parametrize("mistake", ["drop-grad-x", "flip-grad-x"])
def test_negative_control_wrong_running_cost_adjoint(mistake, generator):
    """A running cost with the right value and ∇θ but a wrong ∇ₓ breaks adjoint == autograd."""
    pb = make_problem("em", generator)
    kl = pb.cost

    def wrong(x, m):
        if mistake == "drop-grad-x":
            return kl(x.detach(), m)  # ∇ₓc_m missing from a_m
        return 2 * kl(x.detach(), m) - kl(x, m)  # same value and ∇θ, −∇ₓc_m

    ref, g_ref = run(autograd_through_sampler, pb)
    bad, g_bad = run(adjoint_through_sampler, pb, cost=wrong)
    assert_close64(bad.loss, ref.loss)  # only the gradient route differs
    diff = max(float((a - r).abs().max() / r.abs().max()) for a, r in zip(g_bad, g_ref))
    assert diff > 1e-4


# ---------------------------------------------------------------------------------------------
# Storage modes and the pieces of the API
# ---------------------------------------------------------------------------------------------


class CountingStep:
    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.step(*args, **kwargs)


@pytest.mark.parametrize("every", [None, 1, 2, 3, M, M + 3])
@pytest.mark.parametrize("noise_kind", ["tensor", "list", "function"])
def test_store_noise_is_bit_identical_to_store_states(every, noise_kind, generator):
    pb = make_problem("em", generator)
    states, g_states = run(adjoint_through_sampler, pb, store="states")
    fixed = pb.noises
    noises = {"tensor": fixed, "list": list(fixed), "function": lambda m: fixed[m]}[noise_kind]
    counting = CountingStep(pb.step)
    pb = pb._replace(step=counting, noises=noises)
    recomputed, g_noise = run(adjoint_through_sampler, pb, store="noise", checkpoint_every=every)
    for a, b in zip(g_noise, g_states):
        assert torch.equal(a, b)
    assert torch.equal(recomputed.grad_x_init, states.grad_x_init)
    k = every if every is not None else math.ceil(math.sqrt(M))
    # forward M + each segment's states recomputed once (M − ⌈M/k⌉) + the sweep's M
    assert counting.calls == 3 * M - math.ceil(M / k)
    traj = sample_with_trajectory(pb.step, pb.model, pb.x0, noises, schedule=pb.schedule, store="noise",
                                  checkpoint_every=every, num_steps=M)  # fmt: skip
    assert len(traj.states) == math.ceil(M / k) + 1
    assert traj.stored_indices() == [*range(0, M, k), M]


def test_adjoint_backward_with_states_tensor_and_surrogate(generator):
    """adjoint_backward from a stacked (M+1, B, D) tensor; adjoint_surrogate().backward() agrees."""
    pb = make_problem("em", generator)
    traj = sample_with_trajectory(pb.step, pb.model, pb.x0, pb.noises, schedule=pb.schedule)
    assert isinstance(traj, Trajectory) and len(traj.states) == M + 1 and traj.stride == 1
    terminal = terminal_reward_gradient(smooth_reward, traj.x_final, weight=LAMBDA)
    ref, g_ref = run(autograd_through_sampler, pb)
    params = list(pb.model.parameters())

    def zero():
        for p in params:
            p.grad = None

    zero()
    stacked = torch.stack(traj.states)
    a0 = adjoint_backward(pb.step, pb.model, stacked, pb.noises, terminal.grad, schedule=pb.schedule,
                          running_cost=pb.cost)  # fmt: skip
    assert_close64(a0, ref.grad_x_init)
    for p, r in zip(params, g_ref):
        assert_close64(p.grad, r)

    zero()
    surrogate, a0_s = adjoint_surrogate(pb.step, pb.model, traj, None, terminal.grad, schedule=pb.schedule,
                                        running_cost=pb.cost)  # fmt: skip
    assert surrogate.ndim == 0 and surrogate.requires_grad
    surrogate.backward()
    assert_close64(a0_s, ref.grad_x_init)
    for p, r in zip(params, g_ref):
        assert_close64(p.grad, r)


def test_params_subset_gets_gradient_and_optimizer_steps(generator):
    pb = make_problem("em", generator)
    params = list(pb.model.parameters())
    info, grads = run(adjoint_through_sampler, pb)
    for p in params:
        assert p.grad is not None and p.grad.grad_fn is None and torch.isfinite(p.grad).all()
        assert float(p.grad.abs().max()) > 0
    # .grad accumulates, like loss.backward()
    adjoint_through_sampler(pb.step, pb.model, pb.x0, pb.noises, smooth_reward, schedule=pb.schedule,
                            weight=LAMBDA, running_cost=pb.cost)  # fmt: skip
    for p, g in zip(params, grads):
        assert_close64(p.grad, 2 * g)
    # any torch.optim optimizer and clipping work on it; a small step lowers the loss
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
    before = loss_value(pb)
    torch.optim.SGD(params, lr=1e-3).step()
    assert loss_value(pb) < before
    # params= restricts where the gradient goes
    for p in params:
        p.grad = None
    adjoint_through_sampler(pb.step, pb.model, pb.x0, pb.noises, smooth_reward, schedule=pb.schedule,
                            params=[pb.model.w2])  # fmt: skip
    assert pb.model.w2.grad is not None and pb.model.w1.grad is None


class _Box:
    def __init__(self, t):
        self.t = t


class SavedTensors:
    """Counts tensors saved for backward that are still alive (saved_tensors_hooks + weakrefs)."""

    def __init__(self):
        self.live = weakref.WeakSet()

    def pack(self, t):
        box = _Box(t.detach())  # detached: the box must not keep the graph alive itself
        self.live.add(box)
        return box

    @staticmethod
    def unpack(box):
        return box.t


@pytest.mark.parametrize("fn", [adjoint_through_sampler, autograd_through_sampler], ids=["adjoint", "autograd"])
def test_no_step_graph_outlives_its_step(fn, generator):
    """At the start of every differentiable step, no earlier step's saved tensors are alive.

    Negative control: autograd through the sampler keeps them all (the count grows with m).
    """
    pb = make_problem("em", generator)
    saved = SavedTensors()
    alive_at_step = []

    def watched_step(*args, **kwargs):
        if torch.is_grad_enabled():
            alive_at_step.append(len(saved.live))
        return em_step(*args, **kwargs)

    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        info, _ = run(fn, pb._replace(step=watched_step))
    assert len(alive_at_step) == M
    if fn is adjoint_through_sampler:
        assert alive_at_step == [0] * M
    else:
        assert all(b > a for a, b in zip(alive_at_step, alive_at_step[1:]))
    assert len(saved.live) == 0  # nothing survives the call
    assert info.grad_x_init.grad_fn is None and not info.x_final.requires_grad


def test_terminal_reward_gradient_closed_form_and_errors(generator):
    x = torch.randn(B, D, generator=generator, dtype=torch.float64)
    out = terminal_reward_gradient(lambda y: -((y - TARGET) ** 2).sum(1), x, weight=LAMBDA)
    # ∇ₓ(−λ (1/B) Σ −‖x_i − c‖²) = 2λ(x − c)/B
    assert_close64(out.grad, 2 * LAMBDA * (x - TARGET) / B)
    assert_close64(out.reward, -((x - TARGET) ** 2).sum(1).mean())
    assert not x.requires_grad

    def indicator(y):
        return (y[:, 0] > 0).to(y.dtype)

    with pytest.raises(ValueError, match="reward_fn indicator is not differentiable"):
        terminal_reward_gradient(indicator, x)
    pb = make_problem("em", generator, with_cost=False)
    for fn in (adjoint_through_sampler, autograd_through_sampler):
        with pytest.raises(ValueError, match="not differentiable"):
            fn(pb.step, pb.model, pb.x0, pb.noises, indicator, schedule=pb.schedule)
    with pytest.raises(ValueError, match="one value per particle"):
        terminal_reward_gradient(lambda y: y.sum(), x)


def test_bad_arguments_name_the_problem(generator):
    pb = make_problem("em", generator)
    common = dict(schedule=pb.schedule)
    with pytest.raises(ValueError, match="store must be 'states' or 'noise'"):
        sample_with_trajectory(pb.step, pb.model, pb.x0, pb.noises, store="disk", **common)
    with pytest.raises(ValueError, match="checkpoint_every applies to store='noise'"):
        sample_with_trajectory(pb.step, pb.model, pb.x0, pb.noises, checkpoint_every=2, **common)
    with pytest.raises(ValueError, match="num_steps is required"):
        sample_with_trajectory(pb.step, pb.model, pb.x0, None, **common)
    with pytest.raises(ValueError, match="5 noises for 4 steps"):
        sample_with_trajectory(pb.step, pb.model, pb.x0, pb.noises, num_steps=4, **common)
    with pytest.raises(ValueError, match="pre-drawn"):
        sample_with_trajectory(pb.step, pb.model, pb.x0, pb.noises, generator=torch.Generator(), **common)
    traj = sample_with_trajectory(pb.step, pb.model, pb.x0, pb.noises, **common)
    with pytest.raises(ValueError, match="terminal_grad must have the samples' shape"):
        adjoint_backward(pb.step, pb.model, traj, None, torch.zeros(B), **common)
    with pytest.raises(ValueError, match="carries its own noises"):
        adjoint_backward(pb.step, pb.model, traj, pb.noises.clone(), torch.zeros(B, D), **common)
    with pytest.raises(ValueError, match="must return a 0-d tensor"):
        adjoint_backward(pb.step, pb.model, traj, None, torch.zeros(B, D, dtype=torch.float64),
                         running_cost=lambda x, m: x.sum(1), **common)  # fmt: skip
    with pytest.raises(ValueError, match="strictly decreasing"):
        GirsanovKL(pb.model, torch.linspace(0.0, 1.0, M + 1), prediction="score")
    noise_traj = sample_with_trajectory(pb.step, pb.model, pb.x0, pb.noises, store="noise", **common)
    with pytest.raises(ValueError, match="checkpoints only"):
        GirsanovKL(pb.model, pb.schedule, prediction="score").path_kl(noise_traj)


# ---------------------------------------------------------------------------------------------
# Girsanov path KL
# ---------------------------------------------------------------------------------------------


def test_girsanov_zero_at_reference_positive_elsewhere(generator):
    pb = make_problem("em", generator, with_cost=False)
    kl = GirsanovKL(pb.model, pb.schedule, weight=BETA, prediction="score")
    traj = sample_with_trajectory(pb.step, pb.model, pb.x0, pb.noises, schedule=pb.schedule)
    assert float(kl.path_kl(traj)) == 0.0
    # at θ = θ₀ the cost is at its minimum: zero value, zero gradients in x and θ
    x = traj.states[2].clone().requires_grad_(True)
    c = kl(x, 2)
    grads = torch.autograd.grad(c, [x, *pb.model.parameters()])
    assert float(c.detach()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)
    perturb(pb.model, generator)
    traj = sample_with_trajectory(pb.step, pb.model, pb.x0, pb.noises, schedule=pb.schedule)
    value = kl.path_kl(traj)
    assert float(value) > 0
    # the running cost summed along the path is β·KL; to_score rescales the gap: ‖2Δ‖² = 4‖Δ‖²
    assert_close64(sum(kl(traj.states[m], m) for m in range(M)), BETA * value)
    doubled = GirsanovKL(pb.model, pb.schedule, to_score=lambda out, x, t: 2 * out)
    doubled.reference = kl.reference
    assert_close64(doubled.path_kl(traj.states), 4 * value)


@pytest.mark.parametrize("kind", ["ou", "vp"])
def test_girsanov_constant_is_the_exact_transition_kl(kind, generator):
    """Per step, ½β(t_m)h_m‖s_θ − s_θ₀‖² (= h_m‖Δs‖² for OU, β ≡ 2) equals the exact
    KL(N(μ_θ, σ_m² I) ‖ N(μ_θ₀, σ_m² I)) of the Euler–Maruyama step, σ_m² = β(t_m)h_m, computed by
    torch.distributions with an independent deepcopy of θ₀; DiscreteMeanKL (the DDPM-discrete
    form) gives the same numbers. Negative control: the OU constant on the VP step is wrong."""
    pb = make_problem("em", generator, with_cost=False)
    times = pb.schedule.times
    schedule, step = (pb.schedule, em_step) if kind == "ou" else (VPLikeSchedule(times), vp_em_step)
    theta0 = copy.deepcopy(pb.model)
    kl = GirsanovKL(pb.model, schedule, weight=1.0, prediction="score")  # β(t) read from the schedule when it has one
    rate = [2.0 if kind == "ou" else float(schedule.beta(times[m])) for m in range(M)]
    sigmas = [math.sqrt(rate[m] * float(times[m] - times[m + 1])) for m in range(M)]
    mean_kl = DiscreteMeanKL(step, pb.model, sigmas, 1.0, schedule=schedule)
    ou_constant = GirsanovKL(pb.model, times, prediction="score")
    perturb(pb.model, generator)
    traj = sample_with_trajectory(step, pb.model, pb.x0, pb.noises, schedule=schedule)
    total = 0.0
    with torch.no_grad():
        for m in range(M):
            x, zero = traj.states[m], torch.zeros(B, D, dtype=torch.float64)
            p = torch.distributions.Normal(step(x, pb.model, m, schedule=schedule, noise=zero), sigmas[m])
            q = torch.distributions.Normal(step(x, theta0, m, schedule=schedule, noise=zero), sigmas[m])
            exact = torch.distributions.kl_divergence(p, q).sum(1).mean()
            assert_close64(kl(x, m), exact)
            assert_close64(mean_kl(x, m), exact)
            assert (kind == "ou") == bool(torch.isclose(ou_constant(x, m), exact, rtol=1e-10))
            total = total + exact
    assert_close64(kl.path_kl(traj), total)


def test_girsanov_linear_gaussian_closed_form():
    """1-D, s_θ(x, t) = −(x − θe^{−t}): ‖s_θ − s_θ₀‖² = (θ − θ₀)²e^{−2t} for every x, so
    KL = (θ − θ₀)² ∫₀ᵀ e^{−2t} dt = (θ − θ₀)²(1 − e^{−2T})/2. On the uniform grid t_m = T(1 − m/M)
    the sum Σ h e^{−2t_m} takes each interval's right end (e^{−2t} is decreasing there), so it
    underestimates, by at most h(1 − e^{−2T})(θ − θ₀)², and the error halves as M doubles."""
    theta0, theta, T = 0.3, 1.1, 1.5
    exact = (theta - theta0) ** 2 * (1 - math.exp(-2 * T)) / 2
    errors = []
    for n in (25, 50, 100, 200):
        model = LinearScore(theta0)
        sched = Schedule(torch.linspace(T, 0.0, n + 1, dtype=torch.float64))
        kl = GirsanovKL(model, sched, prediction="score")
        with torch.no_grad():
            model.theta.fill_(theta)
        g = torch.Generator().manual_seed(n)
        x0 = torch.randn(16, 1, generator=g, dtype=torch.float64)
        noises = torch.randn(n, 16, 1, generator=g, dtype=torch.float64)
        traj = sample_with_trajectory(em_step, model, x0, noises, schedule=sched)
        value = kl.path_kl(traj)
        riemann = (theta - theta0) ** 2 * sum((T / n) * math.exp(-2 * float(t)) for t in sched.times[:-1])
        assert_close64(value, f64(riemann))  # x-independent: no Monte Carlo error at all
        err = exact - float(value)
        assert 0 < err <= (T / n) * (1 - math.exp(-2 * T)) * (theta - theta0) ** 2
        errors.append(err)
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.45 < fine / coarse < 0.55
    # negative control: the "½∫‖Δs‖²" constant (forgetting Δμ = 2Δs) misses by a factor of 2
    assert abs(0.5 * float(value) - exact) > 10 * errors[-1]
