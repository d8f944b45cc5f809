"""DRaFT-K (``autograd_through_sampler(..., last_k=K)``, ``DiffusionNestedLoop(gradient="autograd", last_k=K)``,
``diffusion-finetune --set algorithm=draft-k``): the reward backpropagated through the last K sampler steps.

A wrong truncation fails: K = M must be the full backprop; K < M must equal a finite-difference derivative of
the surrogate (θ varied in the last K steps only, x_{M−K} held where θ put it) and differ from the full one."""

from __future__ import annotations

import pytest
import torch

from implicit_diffusion import DiffusionModel, DiffusionNestedLoop, GirsanovKL, ScoreMLP, VPSchedule, ddpm_step
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import diffusion_finetune as ft
from implicit_diffusion.objectives.adjoint import adjoint_through_sampler, autograd_through_sampler

M, B = 6, 5


def reward(x):
    return -((x - torch.tensor([1.0, -0.5], dtype=x.dtype)) ** 2).sum(1) + torch.sin(2 * x[:, 0])


def setup(seed: int = 0):
    """An ε-prediction MLP moved off its initialisation (θ ≠ θ₀ of the path KL), x_0 and the noises (float64)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ScoreMLP(2, hidden=16, depth=2, prediction="epsilon").double()
    model = DiffusionModel(net, "epsilon", VPSchedule("linear", num_steps=M), (2,))
    kl = GirsanovKL(model, weight=0.7, step=ddpm_step)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x0 = torch.randn(B, 2, generator=g, dtype=torch.float64)
    noises = torch.randn(M, B, 2, generator=g, dtype=torch.float64)
    return net, model, kl, x0, noises


def grads(net, fn, *args, **kwargs):
    for p in net.parameters():
        p.grad = None
    info = fn(*args, **kwargs)
    return torch.cat([p.grad.flatten() for p in net.parameters()]), info


@pytest.mark.parametrize("with_kl", [False, True])
def test_k_equal_to_m_is_the_full_backprop_and_the_adjoint(with_kl):
    net, model, kl, x0, noises = setup()
    cost = kl if with_kl else None
    full, _ = grads(net, autograd_through_sampler, ddpm_step, model, x0, noises, reward, weight=2.0,
                    running_cost=cost)
    k_m, info = grads(net, autograd_through_sampler, ddpm_step, model, x0, noises, reward, weight=2.0,
                      running_cost=cost, last_k=M)
    adj, _ = grads(net, adjoint_through_sampler, ddpm_step, model, x0, noises, reward, weight=2.0,
                   running_cost=cost)
    assert torch.equal(full, k_m)
    torch.testing.assert_close(adj, full, rtol=1e-10, atol=1e-12)
    assert info.grad_x_init.abs().sum() > 0  # K = M: ∇_{x_0} as before


@pytest.mark.parametrize("k", [1, 3])
def test_k_below_m_is_the_derivative_of_the_truncated_surrogate(k):
    """Central finite differences along random directions v of the surrogate at θ + εv: the last K steps rerun
    at θ + εv from x_{M−K}(θ), the path KL at the first M − K states of θ's path and at the rerun states,
    against ⟨∇L_K, v⟩; and ∇L_K ≠ ∇L (the first M − K steps matter)."""
    net, model, kl, x0, noises = setup(seed=k)
    lam = 2.0
    g_k, info = grads(net, autograd_through_sampler, ddpm_step, model, x0, noises, reward, weight=lam,
                      running_cost=kl, last_k=k)
    g_full, _ = grads(net, autograd_through_sampler, ddpm_step, model, x0, noises, reward, weight=lam,
                      running_cost=kl)
    with torch.no_grad():  # the path at θ: x_0..x_M
        xs = [x0]
        for m in range(M):
            xs.append(ddpm_step(xs[-1], net, m, schedule=model.schedule, noise=noises[m], prediction="epsilon"))
    params = list(net.parameters())
    theta = [p.detach().clone() for p in params]

    def surrogate(shift) -> float:
        with torch.no_grad():
            for p, t, s in zip(params, theta, shift):
                p.copy_(t + s)
            cost = sum(float(kl(xs[m], m)) for m in range(M - k))
            x = xs[M - k]
            for m in range(M - k, M):
                cost += float(kl(x, m))
                x = ddpm_step(x, net, m, schedule=model.schedule, noise=noises[m], prediction="epsilon")
            value = -lam * float(reward(x).mean()) + cost
            for p, t in zip(params, theta):
                p.copy_(t)
        return value

    gen = torch.Generator().manual_seed(10 + k)
    eps = 1e-6
    for _ in range(3):
        v = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in theta]
        fd = (surrogate([eps * d for d in v]) - surrogate([-eps * d for d in v])) / (2 * eps)
        directional = float(g_k @ torch.cat([d.flatten() for d in v]))
        assert directional == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert (g_k - g_full).norm() > 1e-3 * g_full.norm()  # the truncation is real
    assert torch.equal(info.grad_x_init, torch.zeros_like(x0))  # the gradient stops at x_{M−K}
    full_info = autograd_through_sampler(ddpm_step, model, x0, noises, reward, weight=lam, running_cost=kl)
    assert torch.equal(info.x_final, full_info.x_final) and torch.equal(info.loss, full_info.loss)


@pytest.mark.parametrize("bad", [0, M + 1, -1, 1.5, True, "2"])
def test_a_bad_k_is_an_error_naming_it(bad):
    net, model, kl, x0, noises = setup()
    with pytest.raises(ValueError, match=f"last_k must be an integer from 1 to the number of sampler steps \\({M}\\)"):
        autograd_through_sampler(ddpm_step, model, x0, noises, reward, last_k=bad)
    with pytest.raises(ValueError, match="last_k must be an integer"):
        DiffusionNestedLoop(model, ddpm_step, torch.optim.SGD(net.parameters(), lr=0.1), init_fn=model.init_fn(2),
                            reward_fn=reward, gradient="autograd", last_k=bad)


def test_the_nested_loop_takes_the_truncated_gradient():
    """One DiffusionNestedLoop update with last_k = 2 and SGD(lr) moves θ by −lr·∇L_2 of its own draw."""
    net, model, kl, _, _ = setup()
    with pytest.raises(ValueError, match="needs gradient='autograd'"):
        DiffusionNestedLoop(model, ddpm_step, torch.optim.SGD(net.parameters(), lr=0.1), init_fn=model.init_fn(2),
                            reward_fn=reward, last_k=2)
    lr, init = 0.05, model.init_fn(B)
    algo = DiffusionNestedLoop(model, ddpm_step, torch.optim.SGD(net.parameters(), lr=lr), init_fn=init,
                               reward_fn=reward, reward_weight=2.0, running_cost=kl, gradient="autograd", last_k=2)
    gen = torch.Generator().manual_seed(3)
    x0 = init(gen)
    noises = torch.randn((M, B, 2), generator=gen, dtype=torch.float64)
    before = torch.cat([p.detach().flatten() for p in net.parameters()])
    expected, _ = grads(net, autograd_through_sampler, ddpm_step, model, x0, noises, reward, weight=2.0,
                        running_cost=kl, last_k=2)
    algo.step(0, generator=torch.Generator().manual_seed(3))
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    torch.testing.assert_close(after, before - lr * expected, rtol=1e-12, atol=1e-14)


def test_the_experiment_checks_draft_k():
    ft.Config(algorithm="draft-k", draft_k=50)  # K = M is allowed
    with pytest.raises(ConfigError, match="'draft_k' must be from 1 to num_sampling_steps = 50, got 51"):
        ft.Config(algorithm="draft-k", draft_k=51)
    with pytest.raises(ConfigError, match="'draft_k' is the K of algorithm draft-k"):
        ft.Config(algorithm="nested-autograd", draft_k=4)


def test_diffusion_finetune_runs_draft_k(tmp_path):
    import json

    from implicit_diffusion.cli import main

    out = tmp_path / "run"
    assert main(["run", "diffusion-finetune", "--set", "algorithm=draft-k", "--set", "draft_k=2", "--set",
                 "num_steps=3", "--set", "num_sampling_steps=4", "--set", "batch_size=2", "--set", "eval_every=3",
                 "--set", "eval_samples=4", "--set", "grid_images=2", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "draft-k" and summary["runs"][0]["kl"] > 0  # θ moved from θ₀
