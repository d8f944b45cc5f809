"""SingleLoop / NestedLoop: the order of operations (exact), invariants (no autograd history on
particles, every parameter gets a gradient, bit-identical reruns), restarts, schedules, the number
of sampler steps, convergence on a Gaussian toy, and the §5.1 hexagon moving the right way."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_close64, f64, randn64

from implicit_diffusion.algorithms import LR_SCHEDULES, NestedLoop, SingleLoop, make_lr_scheduler
from implicit_diffusion.models import (
    HEXAGON_THETA0,
    EnergyMLP,
    GaussianPotential,
    as_potential,
    hexagon_mixture,
)
from implicit_diffusion.objectives import Estimator, KLToReference, RewardEstimator, Surrogate, hexagon_reward
from implicit_diffusion.samplers import ula_step


def clone_generator(g: torch.Generator) -> torch.Generator:
    c = torch.Generator()
    c.set_state(g.get_state())
    return c


def reward_sum_sin(x):
    return torch.sin(x).sum(1)


def energy_mlp64(dim: int = 2) -> EnergyMLP:
    g = torch.Generator().manual_seed(11)
    V = EnergyMLP(dim, hidden=8).double()
    with torch.no_grad():
        for p in V.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return V


def user_fn(x, params):
    return ((x - params["loc"]) ** 2).sum(-1) * torch.exp(params["log_scale"]) / 2 + 0.1 * torch.cos(x).sum(-1)


def make_potential(name: str):
    if name == "gaussian":
        return GaussianPotential(f64([0.3, -0.2]))
    if name == "mixture":
        return hexagon_mixture(dtype=torch.float64)
    if name == "energy-mlp":
        return energy_mlp64()
    if name == "function":
        return as_potential(user_fn, {"loc": f64([0.5, 0.0]), "log_scale": f64(0.2)})
    raise KeyError(name)


POTENTIAL_NAMES = ["gaussian", "mixture", "energy-mlp", "function"]


def make_algorithm(kind: str, V, lr: float = 0.05, **kw):
    est = RewardEstimator(reward_sum_sin) + KLToReference(V, weight=0.3)
    opt = torch.optim.SGD(V.parameters(), lr=lr)
    if kind == "single":
        return SingleLoop(V, est, opt, step_size=0.1, **kw)
    return NestedLoop(V, est, opt, step_size=0.1, num_inner_steps=3,
                      init_fn=lambda g: torch.randn(40, 2, generator=g, dtype=torch.float64), **kw)


# ---------------------------------------------------------------------------------------------
# Exact: what one iteration does
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POTENTIAL_NAMES)
def test_single_loop_step_order_exact(name, generator):
    """Algorithm 2: Γ_k = Γ(p_k, θ_k); p_{k+1} = Σ(p_k, θ_k) (with θ_k, not θ_{k+1});
    θ_{k+1} = θ_k − ηΓ_k (SGD). Replayed by hand with a copy of the generator (float64, exact)."""
    V = make_potential(name)
    lr = 0.05
    est = RewardEstimator(reward_sum_sin) + KLToReference(V, weight=0.3)
    algo = SingleLoop(V, est, torch.optim.SGD(V.parameters(), lr=lr), step_size=0.1)
    with torch.no_grad():
        for p in V.parameters():  # move away from θ₀ so the KL term is active
            p.add_(0.2 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    x = randn64(generator, 40, 2)
    ref = copy.deepcopy(V)
    theta_k = [p.detach().clone() for p in V.parameters()]
    # Γ(p_k, θ_k) by autograd of the surrogate on a copy
    with torch.no_grad():
        s = est(V, x)
    gamma = torch.autograd.grad(s.loss(ref), list(ref.parameters()), allow_unused=True)
    gamma = [torch.zeros_like(t) if g is None else g for t, g in zip(theta_k, gamma)]
    g2 = clone_generator(generator)
    with torch.no_grad():
        x_expected, _ = ula_step(x, ref, step_size=0.1, generator=g2)
    x1, stats = algo.step(x, 0, generator=generator)
    assert_close64(x1, x_expected)
    for p, t, g in zip(V.parameters(), theta_k, gamma):
        assert_close64(p.grad, g, atol=1e-12)
        assert_close64(p.detach(), t - lr * g, atol=1e-12)
    assert set(stats) == {"reward", "energy_gap"}
    assert_close64(stats["reward"], reward_sum_sin(x).mean())


def test_nested_loop_step_order_exact(generator):
    """Algorithm 1 (cold start): p₀ = init_fn(g), T ULA steps with θ_k, θ_{k+1} = θ_k − ηΓ(p_T, θ_k)."""
    V = hexagon_mixture(dtype=torch.float64)
    lr, T = 0.1, 4

    def init_fn(g):
        return randn64(g, 50, 2)

    est = RewardEstimator(hexagon_reward)
    algo = NestedLoop(V, est, torch.optim.SGD(V.parameters(), lr=lr), init_fn=init_fn, num_inner_steps=T,
                      step_size=0.2)
    ref = copy.deepcopy(V)
    g2 = clone_generator(generator)
    with torch.no_grad():
        x = init_fn(g2)
        for _ in range(T):
            x, _ = ula_step(x, ref, step_size=0.2, generator=g2)
    s = est(ref, x)
    s.loss(ref).backward()
    x_out, stats = algo.step(torch.zeros(50, 2, dtype=torch.float64), 0, generator=generator)
    assert_close64(x_out, x)
    assert_close64(V.logits.detach(), ref.logits.detach() - lr * ref.logits.grad)
    assert_close64(stats["reward"], hexagon_reward(x).mean())


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POTENTIAL_NAMES)
@pytest.mark.parametrize("kind", ["single", "nested"])
def test_particles_have_no_autograd_history(kind, name, generator):
    V = make_potential(name)
    algo = make_algorithm(kind, V)
    x = randn64(generator, 40, 2).requires_grad_(True)  # even if the caller's particles require grad
    x1, _ = algo.step(x, 0, generator=generator)
    assert not x1.requires_grad and x1.grad_fn is None
    seen = []
    x2 = algo.run(x1, 3, generator=generator, callbacks=[lambda k, p, s: seen.append(p)])
    for p in [x2, *seen]:
        assert not p.requires_grad and p.grad_fn is None
    assert x2 is seen[-1]
    for v in algo.step(x2, 0, generator=generator)[1].values():
        assert not v.requires_grad and v.ndim == 0


@pytest.mark.parametrize("name", POTENTIAL_NAMES)
@pytest.mark.parametrize("kind", ["single", "nested"])
def test_every_parameter_gets_a_gradient_and_theta_moves(kind, name, generator):
    V = make_potential(name)
    algo = make_algorithm(kind, V)
    before = [p.detach().clone() for p in V.parameters()]
    algo.step(randn64(generator, 40, 2), 0, generator=generator)
    for p in V.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()
    moved = [not torch.equal(p.detach(), b) for p, b in zip(V.parameters(), before)]
    assert any(moved)
    if name == "energy-mlp":
        # every weight matrix moves; the output bias gets an exactly-cancelling gradient Σwᵢ·1 = 0
        assert all(moved[:-1])


@pytest.mark.parametrize("name", POTENTIAL_NAMES)
@pytest.mark.parametrize("kind", ["single", "nested"])
def test_same_seed_bit_identical(kind, name):
    results = []
    for _ in range(2):
        g = torch.Generator().manual_seed(2024)
        V = make_potential(name)
        algo = make_algorithm(kind, V)
        x = algo.run(randn64(g, 40, 2), 15, generator=g)
        results.append((x, [p.detach().clone() for p in V.parameters()]))
    (xa, ta), (xb, tb) = results
    assert torch.equal(xa, xb)
    assert all(torch.equal(a, b) for a, b in zip(ta, tb))
    # ... and a different seed gives a different run
    g = torch.Generator().manual_seed(2025)
    V = make_potential(name)
    algo = make_algorithm(kind, V)
    assert not torch.equal(algo.run(randn64(g, 40, 2), 15, generator=g), xa)


def test_run_leaves_global_rng_alone(generator):
    V = hexagon_mixture(dtype=torch.float64)
    state = torch.get_rng_state()
    make_algorithm("single", V).run(randn64(generator, 40, 2), 5, generator=generator)
    make_algorithm("nested", V).run(None, 5, generator=generator)
    assert torch.equal(torch.get_rng_state(), state)


def test_run_callbacks_and_start_index(generator):
    V = GaussianPotential(f64([0.0, 0.0]))
    algo = make_algorithm("single", V)
    ks = []
    algo.run(randn64(generator, 10, 2), 4, generator=generator, start=7, callbacks=[lambda k, x, s: ks.append(k)])
    assert ks == [7, 8, 9, 10]
    with pytest.raises(ValueError, match="num_steps must be >= 0"):
        algo.run(randn64(generator, 10, 2), -1)


def test_constructor_errors():
    V = GaussianPotential(f64([0.0]))
    est = RewardEstimator(reward_sum_sin)
    opt = torch.optim.SGD(V.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="sampler_steps_per_update must be >= 1, got 0"):
        SingleLoop(V, est, opt, step_size=0.1, sampler_steps_per_update=0)
    with pytest.raises(ValueError, match="num_inner_steps must be >= 1, got 0"):
        NestedLoop(V, est, opt, step_size=0.1, num_inner_steps=0, init_fn=lambda g: None)


# ---------------------------------------------------------------------------------------------
# NestedLoop: cold restarts vs warm start
# ---------------------------------------------------------------------------------------------


class CountingInit:
    def __init__(self, n=30):
        self.calls = 0
        self.n = n
        self.outputs = []

    def __call__(self, g):
        self.calls += 1
        x = torch.randn(self.n, 2, generator=g, dtype=torch.float64)
        self.outputs.append(x)
        return x


class CountingSampler:
    """Wraps ula_step; records each call's input particles and step size."""

    def __init__(self):
        self.inputs = []
        self.step_sizes = []

    def __call__(self, x, potential, *, step_size, generator=None, noise=None):
        self.inputs.append(x)
        self.step_sizes.append(step_size)
        return ula_step(x, potential, step_size=step_size, generator=generator, noise=noise)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_nested_loop_restarts(warm, generator):
    V = GaussianPotential(f64([0.0, 0.0]))
    init, sampler = CountingInit(), CountingSampler()
    T, K = 3, 5
    algo = NestedLoop(V, RewardEstimator(reward_sum_sin), torch.optim.SGD(V.parameters(), lr=0.1),
                      init_fn=init, num_inner_steps=T, step_size=0.1, sampler=sampler, warm_start=warm)
    outs = []
    algo.run(None, K, generator=generator, callbacks=[lambda k, x, s: outs.append(x)])
    assert len(sampler.inputs) == T * K
    assert init.calls == (1 if warm else K)
    for k in range(K):
        first_input = sampler.inputs[k * T]
        if warm and k > 0:
            assert first_input is outs[k - 1]  # the particles carry over
        else:
            assert first_input is init.outputs[k]  # a fresh draw from p₀
    # warm start with particles given: p₀ never drawn
    init2 = CountingInit()
    algo2 = NestedLoop(V, RewardEstimator(reward_sum_sin), torch.optim.SGD(V.parameters(), lr=0.1),
                       init_fn=init2, num_inner_steps=T, step_size=0.1, warm_start=True)
    algo2.run(randn64(generator, 30, 2), 3, generator=generator)
    assert init2.calls == 0


# ---------------------------------------------------------------------------------------------
# Sampler steps per update, step-size schedules, lr schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("S", [1, 3])
def test_single_loop_sampler_steps_per_update(S, generator):
    V = hexagon_mixture(dtype=torch.float64)
    sampler = CountingSampler()
    seen_by_estimator = []

    class Recording(Estimator):
        def __call__(self, potential, x):
            seen_by_estimator.append(x)
            return RewardEstimator(hexagon_reward)(potential, x)

    algo = SingleLoop(V, Recording(), torch.optim.SGD(V.parameters(), lr=0.1),
                      step_size=lambda k: 0.1 / (k + 1), sampler=sampler, sampler_steps_per_update=S)
    K = 4
    x0 = randn64(generator, 20, 2)
    outs = []
    algo.run(x0, K, generator=generator, callbacks=[lambda k, x, s: outs.append(x)])
    assert len(sampler.inputs) == S * K
    assert len(seen_by_estimator) == K
    assert sampler.step_sizes == [0.1 / (k + 1) for k in range(K) for _ in range(S)]
    # Γ is evaluated on p_k, the particles at the start of each update, which the S steps then advance
    assert seen_by_estimator[0] is x0 and sampler.inputs[0] is x0
    for k in range(1, K):
        assert seen_by_estimator[k] is outs[k - 1] and sampler.inputs[k * S] is outs[k - 1]


class ConstantGamma(Estimator):
    """Γ = Σᵢ (1/N) ∇θV(xᵢ) — constant for the potential V(x, θ) = Σⱼ θⱼ below."""

    def __call__(self, potential, x):
        return Surrogate((x,), (torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype),), {})


def linear_in_theta(x, theta):
    return (x * 0).sum(-1) + theta.sum()


def test_inverse_sqrt_schedule_exact(generator):
    """With ∇θV ≡ 1, Γ ≡ 1 and SGD gives θ_K = θ₀ − η Σ_{k<K} 1/√(k+1); the scheduler's lr after k
    steps is η/√(k+1). Exact (float64)."""
    V = as_potential(linear_in_theta, f64([0.0, 1.0]))
    eta, K = 0.3, 12
    opt = torch.optim.SGD(V.parameters(), lr=eta)
    sched = make_lr_scheduler(opt, "inverse-sqrt")
    algo = SingleLoop(V, ConstantGamma(), opt, step_size=0.1, lr_scheduler=sched)
    lrs = []
    algo.run(randn64(generator, 5, 2), K, generator=generator,
             callbacks=[lambda k, x, s: lrs.append(opt.param_groups[0]["lr"])])
    for k, lr in enumerate(lrs):
        assert lr == pytest.approx(eta / math.sqrt(k + 2), rel=1e-12)  # after k + 1 scheduler steps
    total = sum(eta / math.sqrt(k + 1) for k in range(K))
    assert_close64(V.theta.detach(), f64([0.0, 1.0]) - total)


def test_constant_schedule_and_unknown_schedule():
    V = GaussianPotential(f64([0.0]))
    opt = torch.optim.SGD(V.parameters(), lr=0.1)
    assert make_lr_scheduler(opt, "constant") is None
    assert LR_SCHEDULES == ("constant", "inverse-sqrt")
    with pytest.raises(ValueError, match=r"unknown learning-rate schedule 'cosine'; allowed: constant, inverse-sqrt"):
        make_lr_scheduler(opt, "cosine")


# ---------------------------------------------------------------------------------------------
# Convergence on a Gaussian toy
# ---------------------------------------------------------------------------------------------

TARGET = f64([1.5, -1.0])


def toward_target(x):
    return -((x - TARGET) ** 2).sum(1)


def run_toy(optimizer: str, lr: float, generator, steps: int = 1500, n: int = 2000) -> torch.Tensor:
    V = GaussianPotential(f64([0.0, 0.0]))
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(V.parameters(), lr=lr)
    algo = SingleLoop(V, RewardEstimator(toward_target), opt, step_size=0.1)
    trace = []
    algo.run(randn64(generator, n, 2), steps, generator=generator,
             callbacks=[lambda k, x, s: trace.append(V.mean.detach().clone())])
    return torch.stack(trace[-500:]).mean(0)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adam", 0.02)])
def test_single_loop_converges_on_gaussian_toy(optimizer, lr, generator):
    """V = ‖x − θ‖²/2, R = −‖x − a‖²: −E[R] = ‖θ − a‖² + d is minimised at θ* = a = (1.5, −1). Under
    ULA the particle variance v ≠ 1 but Γ_R = 2v(m − a) vanishes exactly at m = θ = a.

    θ̄ = θ averaged over the last 500 of 1,500 iterations (N = 2,000, γ = 0.1). SGD (η = 0.05),
    linearised: per-step Γ sd s ≈ √(28/N) ≈ 0.12, contraction |λ| ≈ 0.954, sd(θ) ≈ ηs/√(1 − λ²) ≈ 0.02,
    sd(θ̄) ≈ sd(θ)·√((1 + λ)/((1 − λ)·500)) ≈ 0.006 — the measured sd over seeds 0–19 is 0.006 (SGD)
    and 0.008 (Adam, η = 0.02; Adam's last iterate oscillates with sd ≈ 0.1, hence the average).
    Tolerance 0.06 ≈ 7 sd per coordinate."""
    theta_bar = run_toy(optimizer, lr, generator)
    assert (theta_bar - TARGET).abs().max() <= 0.06


# ---------------------------------------------------------------------------------------------
# §5.1: the hexagon mixture moves the right way
# ---------------------------------------------------------------------------------------------


def exact_hexagon_reward_expectation(V) -> float:
    """E_{π*(θ)}[R] in closed form for unit-variance components (R = f₁(x₁)f₂(x₂), §5.1):
    E[1[x₁ ≥ 0]e^{−(x₁−4)²/20}] = √(10/11) e^{−(c₁−4)²/22} Φ(μ′/√(10/11)), μ′ = (10c₁ + 4)/11, and
    E[e^{−(x₂−3.8)²/20}] = √(10/11) e^{−(c₂−3.8)²/22}."""
    total = 0.0
    for w, (c1, c2) in zip(V.weights.detach().tolist(), V.means.tolist()):
        mu = (10 * c1 + 4) / 11
        phi = 0.5 * (1 + math.erf(mu / math.sqrt(10 / 11) / math.sqrt(2)))
        e1 = math.sqrt(10 / 11) * math.exp(-((c1 - 4) ** 2) / 22) * phi
        e2 = math.sqrt(10 / 11) * math.exp(-((c2 - 3.8) ** 2) / 22)
        total += w * e1 * e2 / 2.5
    return total


def test_exact_hexagon_reward_expectation_matches_monte_carlo(generator):
    """The closed form above vs 200,000 exact draws (SE ≈ 0.1/√n ≈ 2e-4; tolerance 5 SE from the
    sample's sd) at θ₀ (paper-notes: ≈ 0.073) and at another θ."""
    for theta in (HEXAGON_THETA0, (0.0, 2.0, 0.0, 0.0, -1.0, 0.5)):
        V = hexagon_mixture(theta, dtype=torch.float64)
        r = hexagon_reward(V.sample(200_000, generator=generator))
        se = float(r.std()) / math.sqrt(r.numel())
        assert abs(float(r.mean()) - exact_hexagon_reward_expectation(V)) <= 5 * se
    assert exact_hexagon_reward_expectation(hexagon_mixture(dtype=torch.float64)) == pytest.approx(0.073, abs=5e-4)


def run_hexagon(lr: float, seed_generator: torch.Generator, steps: int = 300, n: int = 2000):
    V = hexagon_mixture(dtype=torch.float64)
    algo = SingleLoop(V, RewardEstimator(hexagon_reward), torch.optim.SGD(V.parameters(), lr=lr), step_size=0.2)
    x0 = randn64(seed_generator, n, 2)
    x = algo.run(x0, steps, generator=seed_generator)
    return V, x0, x


def mean_and_se(r: torch.Tensor) -> tuple[float, float]:
    return float(r.mean()), float(r.std()) / math.sqrt(r.numel())


def test_hexagon_single_loop_raises_reward(seed):
    """Paper §5.1 setting, shortened: 2,000 particles from N(0, I), γ = 0.2, SGD η = 0.1, 300 steps.

    - The particles' mean reward rises from ≈ 0.059 to ≈ 0.109; SE of each mean ≈ sd/√2000 ≈ 0.0015
      (start) and 0.0026 (end), so SE of the difference ≈ 0.003 (taken as independent: conservative,
      the two are positively correlated). Assert a rise of ≥ 5 SE (seeds 0–19: 14.8–18.0 SE).
      Control: the same seed with η = 0 (sampling only; the particles relax to π*(θ₀), E[R] ≈ 0.073)
      must end ≥ 5 SE below the optimised run (seeds 0–19: 9.0–12.0 SE), so the rise is the
      optimisation's, not the relaxation's. (With 1,000 particles this margin was only 6.1 SE at
      worst, hence 2,000.)
    - θ itself: the exact E_{π*(θ)}[R] rises from 0.0726 to ≈ 0.136 (seeds 0–19: 0.1355–0.1367);
      assert ≥ 0.10.
    - Mass moves toward c₂ (index 1): its weight rises from 0.0608 to ≈ 0.077 (seeds 0–19:
      0.073–0.081, sd 0.0017); assert a rise ≥ 0.007 (≥ 5 sd below the mean rise 0.016). Its logit
      rises by 0.40–0.49 (sd 0.017; assert > 0.2) while c₃…c₆ lose weight."""
    g_opt = torch.Generator().manual_seed(seed)
    g_ctrl = torch.Generator().manual_seed(seed)
    V, x0, x = run_hexagon(0.1, g_opt)
    V_ctrl, _, x_ctrl = run_hexagon(0.0, g_ctrl)
    r0, se0 = mean_and_se(hexagon_reward(x0))
    r1, se1 = mean_and_se(hexagon_reward(x))
    rc, sec = mean_and_se(hexagon_reward(x_ctrl))
    assert r1 - r0 >= 5 * math.hypot(se0, se1)
    assert r1 - rc >= 5 * math.hypot(se1, sec)
    e0, e1 = exact_hexagon_reward_expectation(V_ctrl), exact_hexagon_reward_expectation(V)
    assert e0 == pytest.approx(0.0726, abs=1e-3)  # the control's θ did not move
    assert e1 >= 0.10
    w0 = torch.softmax(f64(HEXAGON_THETA0), 0)
    w = V.weights.detach()
    assert float(w[1] - w0[1]) >= 0.007
    assert float(V.logits[1].detach()) > HEXAGON_THETA0[1] + 0.2
    assert (w[2:] < w0[2:]).all()
