"""Adjoint Matching, the checks that tests/test_adjoint_matching_sampler.py leaves out.

- the ``.grad`` that ``adjoint_matching_backward`` accumulates one step's graph at a time is the autograd
  gradient of L(θ) = Σ_m (1/B) Σ_i ‖u_m(x_m,i) + σ_m ã_{m+1,i}‖², written out here independently (ã by
  autograd through the base model's noise-fixed steps, σ_m from the step), float64 to 1e-10;
- on a linear-Gaussian chain with a linear reward the optimal control is known in closed form: the loss
  and its gradient are 0 there, the chain samples the tilted mean there, and the sign-flipped control
  has the exact loss Σ_m (2σ_m ã_{m+1})² and a non-zero gradient;
- a statistical check of the trained sampler against the tilted law's mean, with a negative control
  (training with a sign-flipped lean adjoint) that fails it;
- a step whose noise scale is not one number per step (varies over coordinates, or with the state) is refused.
"""

from __future__ import annotations

import pytest
import torch
from test_adjoint_matching_sampler import GaussianEps, chain_law

from implicit_diffusion import ScoreMLP, VPSchedule, ddpm_step
from implicit_diffusion.algorithms import DiffusionAdjointMatching
from implicit_diffusion.objectives import adjoint_matching as am
from implicit_diffusion.objectives.adjoint_matching import adjoint_matching_backward, frozen_copy

F64 = torch.float64


# --------------------------------------------------------------------------- the gradient, written out


def test_the_accumulated_gradient_is_autograd_of_the_written_out_loss():
    M, B, lam, beta = 4, 5, 2.0, 0.5
    sch = VPSchedule("linear", num_steps=M)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        net = ScoreMLP(2, hidden=16, depth=2, prediction="epsilon").double()
    base = frozen_copy(net)
    with torch.no_grad():  # θ ≠ θ₀
        g = torch.Generator().manual_seed(4)
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=F64))
    g = torch.Generator().manual_seed(5)
    x0, noises = torch.randn(B, 2, generator=g, dtype=F64), torch.randn(M, B, 2, generator=g, dtype=F64)

    def reward(x):
        return torch.sin(2 * x[:, 0]) * x[:, 1] - 0.3 * (x**2).sum(1)

    def step(x, model, m, noise):
        return ddpm_step(x, model, m, schedule=sch, noise=noise, prediction="epsilon")

    info = adjoint_matching_backward(ddpm_step, net, base, x0, noises, reward, schedule=sch, reward_weight=lam,
                                     kl_weight=beta, prediction="epsilon")
    got = [p.grad.clone() for p in net.parameters()]

    with torch.no_grad():
        states = [x0]
        for m in range(M):
            states.append(step(states[-1], net, m, noises[m]))
        sigma = [float((step(torch.zeros(1, 2, dtype=F64), base, m, torch.ones(1, 2, dtype=F64))
                        - step(torch.zeros(1, 2, dtype=F64), base, m, torch.zeros(1, 2, dtype=F64))).mean())
                 for m in range(M)]
    # ã_M = −(λ/β)∇R(x_M); ã_m = J_mᵀ ã_{m+1} with J_m the full Jacobian of the base mean μ_θ₀(·, m) at the
    # on-policy x_m (a (B·d × B·d) matrix here, block-diagonal; the library takes a vector-Jacobian product)
    x = states[M].clone().requires_grad_(True)
    adj = {M: -(lam / beta) * torch.autograd.grad(reward(x).sum(), x)[0]}
    for m in range(M - 1, 0, -1):
        jac = torch.autograd.functional.jacobian(lambda z: step(z, base, m, torch.zeros_like(z)), states[m])
        adj[m] = (jac.reshape(B * 2, B * 2).T @ adj[m + 1].reshape(-1)).reshape(B, 2)
    zero = torch.zeros_like(x0)
    loss = sum(((step(states[m], net, m, zero) - step(states[m], base, m, zero)) / sigma[m]
                + sigma[m] * adj[m + 1]).pow(2).sum(1).mean() for m in range(M))
    want = torch.autograd.grad(loss, list(net.parameters()))
    assert float(info.loss) == pytest.approx(float(loss.detach()), rel=1e-10)
    assert float(loss.detach()) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# --------------------------------------------------------------------------- a linear-Gaussian chain
# GaussianEps (the exact ε plus a learnable shift per step) and chain_law (x_M's exact mean, variance, ∏A)
# are tests/test_adjoint_matching_sampler.py's


def _at(net, sch, m, x, z):
    one = torch.ones(1, 1, dtype=F64)
    with torch.no_grad():
        return float(ddpm_step(x * one, net, m, schedule=sch, noise=z * one, prediction="epsilon"))


def chain_coefficients(net, sch):
    """Per step (A_m, o_m, σ_m) of the linear chain, read off the step at x ∈ {0, 1}, ξ ∈ {0, 1}."""
    out = []
    for m in range(sch.num_steps):
        o = _at(net, sch, m, 0.0, 0.0)
        out.append((_at(net, sch, m, 1.0, 0.0) - o, o, _at(net, sch, m, 0.0, 1.0) - o))
    return out


def optimal_shifts(net, base, sch, kappa, c):
    """The shifts at which u_m = −σ_m ã_{m+1} for every x: with R = c·x, ã_{m+1} = −κ c ∏_{j>m} A_j (constant),
    and u_m = k_m · shift_m with k_m = ∂(μ_θ − μ_θ₀)/∂shift_m / σ_m (read off the step)."""
    coef = chain_coefficients(base, sch)
    M = sch.num_steps
    adj, a_next = [0.0] * M, -kappa * c  # adj[m] = ã_{m+1}
    for m in range(M - 1, -1, -1):
        adj[m] = a_next
        a_next = coef[m][0] * a_next
    shifts = []
    with torch.no_grad():
        for m in range(M):
            net.shift.zero_()
            net.shift[m] = 1.0
            k = (_at(net, sch, m, 0.0, 0.0) - coef[m][1]) / coef[m][2]
            shifts.append(-coef[m][2] * adj[m] / k)
        net.shift.zero_()
    return torch.tensor(shifts, dtype=F64), adj, [s for _, _, s in coef]


SCH_STEPS, C, LAM, BETA = 8, 0.7, 2.0, 1.0


def _setup():
    sch = VPSchedule("linear", num_steps=SCH_STEPS)
    net = GaussianEps(sch)
    base = frozen_copy(net)
    return sch, net, base


def test_at_the_closed_form_optimum_the_loss_and_its_gradient_vanish_and_the_mean_is_tilted():
    sch, net, base = _setup()
    kappa = LAM / BETA
    m0, v0, prod = chain_law(base, sch)
    shifts, adj, sigma = optimal_shifts(net, base, sch, kappa, C)
    g = torch.Generator().manual_seed(0)
    x0, noises = torch.randn(32, 1, generator=g, dtype=F64), torch.randn(SCH_STEPS, 32, 1, generator=g, dtype=F64)

    def loss_and_grad(sh):
        with torch.no_grad():
            net.shift.copy_(sh)
        net.shift.grad = None
        info = adjoint_matching_backward(ddpm_step, net, base, x0, noises, lambda x: C * x[:, 0], schedule=sch,
                                         reward_weight=LAM, kl_weight=BETA, prediction="epsilon")
        return float(info.loss), net.shift.grad.clone()

    loss, grad = loss_and_grad(shifts)
    assert loss < 1e-24 and float(grad.abs().max()) < 1e-11
    m1, v1, _ = chain_law(net, sch)
    assert m1 == pytest.approx(m0 + kappa * C * (v0 - prod**2), abs=1e-12)  # discrete optimum, exact
    assert abs(m1 - (m0 + kappa * v0 * C)) < 1e-4 * v0 and v1 == pytest.approx(v0, rel=1e-12)

    # negative control: the sign-flipped control u_m = +σ_m ã_{m+1} is 2σ_m|ã_{m+1}| off in every sample
    loss, grad = loss_and_grad(-shifts)
    assert loss == pytest.approx(sum((2 * s * a) ** 2 for s, a in zip(sigma, adj)), rel=1e-10)
    assert float(grad.abs().min()) > 1e-3
    # and a small step against the gradient lowers the loss (the optimum is a minimum, not a saddle)
    lower, _ = loss_and_grad(-shifts - 1e-3 * grad)
    assert lower < loss


def _train_and_sample(seed: int, flip: bool, monkeypatch) -> tuple[float, float, float]:
    sch, net, base = _setup()
    if flip:  # the negative control: ã with the wrong sign (the same error as ã_M = +(λ/β)∇R)
        lean = am.lean_adjoint
        monkeypatch.setattr(am, "lean_adjoint", lambda *a, **k: [-t for t in lean(*a, **k)])
    algo = DiffusionAdjointMatching(net, ddpm_step, sch, torch.optim.Adam(net.parameters(), lr=0.05),
                                    init_fn=lambda g: torch.randn((16, 1), generator=g, dtype=F64),
                                    reward_fn=lambda x: C * x[:, 0], reward_weight=LAM, kl_weight=BETA,
                                    prediction="epsilon")
    algo.run(250, generator=torch.Generator().manual_seed(seed))
    monkeypatch.undo()
    m0, v0, _ = chain_law(base, sch)
    n = 20000
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 1, generator=g, dtype=F64)
    with torch.no_grad():
        for m in range(SCH_STEPS):
            x = ddpm_step(x, net, m, schedule=sch, generator=g, prediction="epsilon")
    return float(x.mean()), m0 + (LAM / BETA) * v0 * C, v0


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_the_trained_sampler_draws_the_tilted_mean_and_a_flipped_adjoint_does_not(seed, monkeypatch):
    """n = 20 000 independent chains of the trained sampler: |mean − (μ_out + (λ/β)Var_out·c)| ≤ 5·√(Var_out/n)
    (Var_out ≈ 0.096, the 8-step chain's exact output variance, so ≈ 0.011; a false failure ≈ 6e-7). The
    trained variance is Var_out exactly (the shift only moves the mean) and the discrete optimum differs from
    the tilt by (λ/β)c(∏A)² ≈ 1e-5 ≪ SE. Seeds 0–7 checked locally: |z| ≤ 1.5. The flipped adjoint drives the
    mean to ≈ μ_out − (λ/β)Var_out·c, 2(λ/β)Var_out·c ≈ 0.27 ≈ 120 SE away, and must fail."""
    mean, target, v0 = _train_and_sample(seed, False, monkeypatch)
    tol = 5 * (v0 / 20000) ** 0.5
    assert abs(mean - target) <= tol
    mean, target, v0 = _train_and_sample(seed, True, monkeypatch)
    assert abs(mean - target) > 10 * tol


# --------------------------------------------------------------------------- errors


def test_a_noise_scale_that_is_not_one_number_per_step_is_refused():
    sch = VPSchedule("linear", num_steps=3)
    net = ScoreMLP(2, hidden=8, depth=1, prediction="epsilon").double()

    def anisotropic(x, model, m, *, schedule, generator=None, noise=None, prediction="score"):
        y = ddpm_step(x, model, m, schedule=schedule, noise=noise, prediction=prediction)
        return y + noise * torch.tensor([0.0, 0.5], dtype=x.dtype)  # σ differs between the coordinates

    def state_dependent(x, model, m, *, schedule, generator=None, noise=None, prediction="score"):
        y = ddpm_step(x, model, m, schedule=schedule, noise=noise, prediction=prediction)
        return y + noise * x.abs()  # σ(x) = σ_m + |x|: the same as DDPM's at the origin only

    x0, noises = torch.zeros(2, 2, dtype=F64), torch.zeros(3, 2, 2, dtype=F64)
    with pytest.raises(ValueError, match="one scale per step.*varies over x"):
        adjoint_matching_backward(anisotropic, net, frozen_copy(net), x0, noises, lambda x: x.sum(1),
                                  schedule=sch, prediction="epsilon")
    with pytest.raises(ValueError, match="one scale per step.*varies over x"):
        adjoint_matching_backward(state_dependent, net, frozen_copy(net), x0 + 1.0, noises, lambda x: x.sum(1),
                                  schedule=sch, prediction="epsilon")
    with pytest.raises(ValueError, match=r"kl_weight \(β\) must be > 0"):
        adjoint_matching_backward(ddpm_step, net, frozen_copy(net), x0, noises, lambda x: x.sum(1),
                                  schedule=sch, kl_weight=0.0, prediction="epsilon")
