"""Adjoint Matching (objectives.adjoint_matching, algorithms.DiffusionAdjointMatching).

A wrong implementation fails: the lean adjoint must equal autograd through the base model's noise-fixed
steps; on a linear-Gaussian chain with a linear reward the trained chain must sample the tilted law's
mean exactly (a sign or scale error in ã or u moves it); the control cost must be the sampler's exact
path KL; θ = θ₀ with R ≡ 0 is a zero loss and a zero gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from implicit_diffusion import DiffusionModel, ScoreMLP, VPSchedule, ddpm_step
from implicit_diffusion.algorithms import DiffusionAdjointMatching
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import diffusion_finetune as ft
from implicit_diffusion.objectives.adjoint_matching import adjoint_matching_backward, frozen_copy, lean_adjoint
from implicit_diffusion.objectives.girsanov import path_kl_cost
from implicit_diffusion.samplers.diffusion import ddim_step

M, B = 5, 6
F64 = torch.float64


def reward(x):
    return -((x - torch.tensor([1.0, -0.5], dtype=x.dtype)) ** 2).sum(1) + torch.sin(2 * x[:, 0])


def mlp(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ScoreMLP(2, hidden=16, depth=2, prediction="epsilon").double()
    return net, VPSchedule("linear", num_steps=M)


def draws(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2, generator=g, dtype=F64), torch.randn(M, B, 2, generator=g, dtype=F64)


def test_the_lean_adjoint_at_the_base_model_is_autograd_through_the_remaining_steps():
    net, sch = mlp()
    x0, noises = draws()
    with torch.no_grad():
        states = [x0]
        for m in range(M):
            states.append(ddpm_step(states[-1], net, m, schedule=sch, noise=noises[m], prediction="epsilon"))
    lam, beta = 3.0, 1.5
    adjoint = lean_adjoint(ddpm_step, net, states, reward, schedule=sch, reward_weight=lam, kl_weight=beta,
                           prediction="epsilon")
    assert len(adjoint) == M
    for m in range(1, M + 1):  # ã_m = −(λ/β) ∇_{x_m} R(x_M), x_M a function of x_m through steps m..M−1
        x = states[m].clone().requires_grad_(True)
        y = x
        for j in range(m, M):
            y = ddpm_step(y, net, j, schedule=sch, noise=noises[j], prediction="epsilon")
        (grad,) = torch.autograd.grad(reward(y).sum(), x)
        torch.testing.assert_close(adjoint[m - 1], -(lam / beta) * grad, rtol=1e-10, atol=1e-12)


def test_the_control_cost_is_the_samplers_path_kl_and_zero_at_the_base():
    """½ Σ_m mean‖u_m‖² on the drawn path = Σ_m GirsanovKL(x_m, m) with DDPM's exact weights; at θ = θ₀ with
    R ≡ 0 the loss and its gradient are 0."""
    net, sch = mlp()
    base = frozen_copy(net)
    x0, noises = draws()
    flat = lambda x: 0.0 * x.sum(1)  # noqa: E731 - R ≡ 0, differentiable
    info = adjoint_matching_backward(ddpm_step, net, base, x0, noises, flat, schedule=sch, prediction="epsilon")
    assert float(info.loss) == 0.0 and float(info.control_cost) == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in net.parameters())

    kl = path_kl_cost(net, sch, 1.0, ddpm_step)  # θ₀ = the weights now
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2), dtype=F64))
    info = adjoint_matching_backward(ddpm_step, net, base, x0, noises, reward, schedule=sch, prediction="epsilon")
    with torch.no_grad():
        x, girsanov = x0, 0.0
        for m in range(M):
            girsanov += float(kl(x, m))
            x = ddpm_step(x, net, m, schedule=sch, noise=noises[m], prediction="epsilon")
    assert float(info.control_cost) == pytest.approx(girsanov, rel=1e-9)
    assert torch.equal(info.x_final, x)


class GaussianEps(nn.Module):
    """The exact ε of data N(μ_d, s_d²) under ``schedule``, plus a learnable shift per sampler step (the control)."""

    prediction = "epsilon"

    def __init__(self, schedule, mu=1.5, sd=0.5):
        super().__init__()
        self.schedule, self.mu, self.var = schedule, mu, sd**2
        self.shift = nn.Parameter(torch.zeros(schedule.num_steps, dtype=F64))

    def forward(self, x, t):
        log_ab = self.schedule.log_alpha_bar(t)[:, None]
        ab, var = log_ab.exp(), -torch.expm1(log_ab)
        m = int(torch.argmin((self.schedule.times - t[0]).abs()))
        return var.sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.var + var) + self.shift[m]


def chain_law(net, schedule) -> tuple[float, float, float]:
    """Mean, variance of x_M and ∏_m A_m of the linear DDPM chain x_{m+1} = A_m x_m + o_m + σ_m ξ_m from N(0, 1)."""
    mean, var, prod = 0.0, 1.0, 1.0
    one = torch.ones(1, 1, dtype=F64)
    with torch.no_grad():
        for m in range(schedule.num_steps):
            at = lambda x, z: float(ddpm_step(x * one, net, m, schedule=schedule, noise=z * one,  # noqa: E731
                                              prediction="epsilon"))
            o, a, s = at(0.0, 0.0), at(1.0, 0.0) - at(0.0, 0.0), at(0.0, 1.0) - at(0.0, 0.0)
            mean, var, prod = a * mean + o, a * a * var + s * s, prod * a
    return mean, var, prod


def test_a_linear_gaussian_chain_learns_the_tilted_mean():
    """R(x) = c·x tilts N(m₀, v₀) to N(m₀ + (λ/β)v₀c, v₀). With a linear chain the optimal control is a shift per
    step and the discrete optimum is exact: the mean moves by (λ/β)c(v₀ − (∏A)²·1), the (∏A)² of the start
    (memorylessness) being negligible here; the variance is unchanged."""
    sch = VPSchedule("linear", num_steps=8)
    net = GaussianEps(sch)
    base = frozen_copy(net)
    m0, v0, prod = chain_law(base, sch)
    assert prod**2 < 1e-4 * v0  # memoryless: x_M forgets x_0
    c, lam, beta = 0.7, 2.0, 1.0
    algo = DiffusionAdjointMatching(net, ddpm_step, sch, torch.optim.Adam(net.parameters(), lr=0.05),
                                    init_fn=lambda g: torch.randn((16, 1), generator=g, dtype=F64),
                                    reward_fn=lambda x: c * x[:, 0], reward_weight=lam, kl_weight=beta,
                                    prediction="epsilon")
    algo.run(400, generator=torch.Generator().manual_seed(0))
    m1, v1, _ = chain_law(net, sch)
    exact = m0 + (lam / beta) * c * (v0 - prod**2)
    assert m1 == pytest.approx(exact, abs=1e-6) and v1 == pytest.approx(v0, rel=1e-12)
    assert abs(m1 - (m0 + (lam / beta) * v0 * c)) < 1e-4 * v0  # the Gaussian tilt's closed form
    assert m1 - m0 > 0.05  # it moved (a sign error moves it the other way, a missing σ by the wrong amount)


def test_errors_name_the_bad_value():
    net, sch = mlp()
    kwargs = dict(init_fn=lambda g: torch.randn((2, 2), generator=g, dtype=F64), reward_fn=reward)
    for bad in (0.0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="kl_weight .* must be a number > 0"):
            DiffusionAdjointMatching(net, ddpm_step, sch, torch.optim.SGD(net.parameters(), lr=0.1), kl_weight=bad,
                                     prediction="epsilon", **kwargs)
    algo = DiffusionAdjointMatching(net, ddim_step, sch, torch.optim.SGD(net.parameters(), lr=0.1),
                                    prediction="epsilon", **kwargs)
    with pytest.raises(ValueError, match="needs a stochastic .*'ddim_step' has noise scale 0"):
        algo.step(0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="needs kl_weight > 0 and sampler = 'ddpm'"):
        ft.Config(algorithm="adjoint-matching", kl_weight=0.0)
    with pytest.raises(ConfigError, match="needs kl_weight > 0 and sampler = 'ddpm'"):
        ft.Config(algorithm="adjoint-matching", sampler="euler-maruyama")


def test_a_checkpoint_continues_bit_for_bit():
    def build(perturb: float):
        net, sch = mlp()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(perturb)
        model = DiffusionModel(net, "epsilon", sch, (2,))
        return net, DiffusionAdjointMatching(model, ddpm_step, torch.optim.Adam(net.parameters(), lr=1e-2),
                                             init_fn=model.init_fn(4), reward_fn=reward, reward_weight=2.0)

    net, algo = build(0.0)
    algo.run(2, generator=torch.Generator().manual_seed(0))
    tensors, meta = algo.state()
    assert any(k.startswith("algo.base.") for k in tensors)
    net2, resumed = build(0.5)  # another θ₀ and θ: the checkpoint must bring both
    resumed.load_state(tensors, meta)
    for algorithm in (algo, resumed):
        algorithm.step(2, generator=torch.Generator().manual_seed(1))
    for (k, p), q in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(p, q), k
    for p, q in zip(algo.base.parameters(), resumed.base.parameters()):
        assert torch.equal(p, q)
