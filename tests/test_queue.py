"""The finite-horizon queue algorithm and the nested baseline on the 1-D Gaussian diffusion.

Model (paper-notes §5): data N(θ, 1), OU forward process, exact score
s_θ(x, t) = −(x − θe^{−t}). The sampler is linear in (x₀, θ, noise), so E[x_M] = c·θ with c the
output of the noiseless sampler from x₀ = 0 at θ = 1, and for R(x) = −(x − θ_target)² the
optimum of E[R] is θ* = θ_target / c exactly, for any discretisation.
"""


import pytest
import torch

from implicit_diffusion.algorithms.diffusion_nested import DiffusionNestedLoop
from implicit_diffusion.algorithms.queue import DiffusionQueue
from implicit_diffusion.samplers.diffusion import euler_maruyama_step
from implicit_diffusion.samplers.schedules import VPSchedule

TARGET = 2.0


class GaussianScore(torch.nn.Module):
    prediction = "score"

    def __init__(self, theta=0.0):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x, t):
        return -(x - self.theta * torch.exp(-t).to(x.dtype)[:, None])


def reward(x):
    return -((x[:, 0] - TARGET) ** 2)


def output_gain(schedule):
    """c with E[x_M] = c·θ: the noiseless sampler from x₀ = 0 at θ = 1."""
    model = GaussianScore(1.0)
    x = torch.zeros(1, 1, dtype=torch.float64)
    with torch.no_grad():
        for m in range(schedule.num_steps):
            x = euler_maruyama_step(x, model, m, schedule=schedule, noise=torch.zeros_like(x))
    return float(x)


def make(kind, schedule, batch=64, lr=0.05, **kw):
    model = GaussianScore(0.0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    init = lambda g: torch.randn(batch, 1, generator=g, dtype=torch.float64)  # noqa: E731
    cls = DiffusionQueue if kind == "queue" else DiffusionNestedLoop
    algo = cls(model, euler_maruyama_step, schedule, opt, init_fn=init, reward_fn=reward, **kw)
    return model, algo


def thetas(model, algo, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    algo.run(k, generator=g, callbacks=[lambda i, x, s: out.append(model.theta.item())])
    return out


def test_m1_queue_equals_nested_with_one_step():
    """M = 1: a batch enters, takes its one step and exits in the same iteration, so there is no
    delay: both algorithms draw x₀ then the step's noise from the generator in that order and
    must give the same θ trajectory (float64, 1e-12)."""
    sched = VPSchedule("ou", num_steps=1, T=1.0, t_min=0.0)
    a = thetas(*make("queue", sched), 30)
    b = thetas(*make("nested", sched), 30)
    assert a == pytest.approx(b, rel=1e-12, abs=1e-12)
    assert a[-1] != a[0]


@pytest.mark.parametrize("kind, options", [
    ("queue", {"adjoint": "sequential"}),
    ("queue", {"adjoint": "pipelined"}),
    ("nested", {"gradient": "adjoint"}),
    ("nested", {"gradient": "autograd"}),
])
def test_converges_to_the_exact_optimum(kind, options):
    """M = 8 (c = 0.912, θ* = 2.193), 400 iterations, batch 64, SGD η = 0.05, from θ₀ = 0.
    Tolerance 0.1 on the mean of the last 100 iterates: measured deviations over seeds 0–7 are
    within ±0.04 for every variant, while θ₀ is 2.19 away and θ_target = 2 (the optimum if the
    sampler's gain c were ignored) is 0.19 away."""
    sched = VPSchedule("ou", num_steps=8, T=1.5, t_min=0.0)
    theta_star = TARGET / output_gain(sched)
    model, algo = make(kind, sched, **options)
    th = thetas(model, algo, 400)
    assert abs(sum(th[-100:]) / 100 - theta_star) < 0.1


def test_queue_particles_hold_no_autograd_history_and_one_batched_forward_call():
    sched = VPSchedule("ou", num_steps=5, T=1.0, t_min=0.0)
    calls = []

    def counting_step(x, model, m, **kw):
        calls.append((torch.is_grad_enabled(), x.shape[0]))
        return euler_maruyama_step(x, model, m, **kw)

    model = GaussianScore(0.0)
    algo = DiffusionQueue(model, counting_step, sched, torch.optim.SGD(model.parameters(), lr=0.01),
                          init_fn=lambda g: torch.randn(4, 1, generator=g, dtype=torch.float64),
                          reward_fn=reward, adjoint="pipelined")
    g = torch.Generator().manual_seed(0)
    for k in range(12):
        calls.clear()
        algo.step(k, generator=g)
        forward = [c for c in calls if not c[0]]
        assert len(forward) == 1  # every slot advanced in one call
        assert forward[0][1] == 4 * min(k + 1, 5)
        backward = [c for c in calls if c[0]]
        assert len(backward) == (1 if k >= 4 else 0)  # all in-flight adjoints in one call
    for f in algo.flights:
        assert all(s.grad_fn is None and not s.requires_grad for s in f.states)


def test_bad_options():
    sched = VPSchedule("ou", num_steps=2)
    with pytest.raises(ValueError, match="'sequential' or 'pipelined'"):
        make("queue", sched, adjoint="fast")
    with pytest.raises(ValueError, match="'adjoint' or 'autograd'"):
        make("nested", sched, gradient="fast")


@pytest.mark.parametrize("adjoint", ["pipelined", "sequential"])
def test_batched_kl_running_cost_equals_one_call_per_batch(adjoint):
    """GirsanovKL has ``per_sample``, so the queue evaluates it once per iteration for all
    in-flight batches. Hiding that method forces one call per batch (the generic path): the θ
    trajectories must agree to float64 precision. The trajectory also differs from the run
    without a KL (the cost is really applied)."""
    from implicit_diffusion.objectives import GirsanovKL

    class OneCallPerBatch:
        def __init__(self, kl):
            self.kl = kl

        def __call__(self, x, m):
            return self.kl(x, m)

    sched = VPSchedule("ou", num_steps=4, T=1.0, t_min=0.0)
    runs = []
    for wrap in (lambda kl: kl, OneCallPerBatch, None):
        model, algo = make("queue", sched, batch=5, adjoint=adjoint)
        model.theta.data.fill_(0.5)
        if wrap is not None:
            algo.running_cost = wrap(GirsanovKL(model, sched, weight=3.0, prediction="score"))
        runs.append(thetas(model, algo, 12))
    torch.testing.assert_close(torch.tensor(runs[0]), torch.tensor(runs[1]), rtol=1e-12, atol=1e-12)
    assert max(abs(a - b) for a, b in zip(runs[0], runs[2])) > 1e-3


class _NoSharing:
    """GirsanovKL evaluated on its own (no reuse of the step's network output), per_sample kept."""

    reuses_model_output = False

    def __init__(self, kl):
        self.kl = kl

    def per_sample(self, x, m):
        return self.kl.per_sample(x, m)

    def __call__(self, x, m):
        return self.kl(x, m)


def _queue_run(adjoint, *, max_batch=None, cost=None, steps=14, batch=5):
    from implicit_diffusion.objectives import GirsanovKL

    sched = VPSchedule("ou", num_steps=4, T=1.0, t_min=0.0)
    model, algo = make("queue", sched, batch=batch, adjoint=adjoint, max_batch=max_batch)
    model.theta.data.fill_(0.5)
    if cost is not None:
        algo.running_cost = cost(GirsanovKL(model, sched, weight=3.0, prediction="score"))
    return torch.tensor(thetas(model, algo, steps))


@pytest.mark.parametrize("adjoint", ["pipelined", "sequential"])
@pytest.mark.parametrize("cost", [None, lambda kl: kl, lambda kl: (lambda x, m: kl(x, m))],
                         ids=["reward only", "per-sample KL", "one call per batch"])
def test_chunked_queue_equals_one_call(adjoint, cost):
    """max_batch = 3 splits the 20-sample forward of 4 slots × 5 and the batched adjoint step into
    chunks (cutting batches apart, or only between whole batches for a cost without per_sample):
    the θ trajectory equals the unchunked queue's to float64 precision."""
    one = _queue_run(adjoint, cost=cost)
    chunked = _queue_run(adjoint, cost=cost, max_batch=3)
    torch.testing.assert_close(chunked, one, rtol=1e-10, atol=1e-12)
    assert (one[-1] - one[0]).abs() > 1e-3  # θ moved: the comparison is not of two constants


def test_chunks_respect_max_batch_and_batch_boundaries():
    sched = VPSchedule("ou", num_steps=2)
    _, algo = make("queue", sched, max_batch=4)
    assert algo._chunks(10) == [(0, 4), (4, 8), (8, 10)]
    assert algo._chunks(10, [3, 3, 4]) == [(0, 3), (3, 6), (6, 10)]
    assert algo._chunks(12, [5, 2, 2, 3]) == [(0, 5), (5, 9), (9, 12)]  # a batch above max_batch alone
    assert algo._chunks(3) == [(0, 3)]
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1 or None, got 0"):
        make("queue", sched, max_batch=0)


@pytest.mark.parametrize("adjoint", ["pipelined", "sequential"])
def test_the_kl_reuses_the_steps_network_forward_with_the_same_result(adjoint):
    """GirsanovKL in the adjoint takes s_θ(x_m, t_m) from the sampler step's own evaluation: the
    θ trajectory equals the one where it evaluates the network itself (float64), with one θ
    forward per adjoint step instead of two (counted: 2 forwards with θ₀'s, instead of 3)."""
    shared = _queue_run(adjoint, cost=lambda kl: kl)
    separate = _queue_run(adjoint, cost=_NoSharing)
    torch.testing.assert_close(shared, separate, rtol=1e-12, atol=1e-12)

    from implicit_diffusion.objectives import GirsanovKL
    from implicit_diffusion.objectives.adjoint import adjoint_step

    sched = VPSchedule("ou", num_steps=4, T=1.0, t_min=0.0)
    model = GaussianScore(0.3)
    kl = GirsanovKL(model, sched, weight=1.0, prediction="score")
    calls = []
    model.register_forward_hook(lambda mod, args, out: calls.append(1))
    x, a = torch.randn(6, 1, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    noise = torch.randn(6, 1, dtype=torch.float64)
    for running_cost, expected in ((kl, 2), (_NoSharing(kl), 3)):
        calls.clear()
        adjoint_step(euler_maruyama_step, model, 2, x, a, noise, schedule=sched, running_cost=running_cost)
        assert len(calls) == expected  # θ₀ is the same module under functional_call: its forward counts too


class NonlinearScore(torch.nn.Module):
    """s_θ(x, t) = −(x − θ₀e^{−t}) − ½ tanh(θ₁x): nonlinear in x, so ∂ₓφ_m and ∂θφ_m depend on
    the state the adjoint reads (with the linear GaussianScore, x_m and x_{m+1} give the same)."""

    prediction = "score"

    def __init__(self):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([0.4, 1.3], dtype=torch.float64))

    def forward(self, x, t):
        return -(x - self.theta[0] * torch.exp(-t).to(x.dtype)[:, None]) - 0.5 * torch.tanh(self.theta[1] * x)


def per_step_gradients(x0, noises, model, schedule):
    """Autograd through the whole M-step chain, −mean R(x_M), with step m using its own copy of
    θ: row m is g_m = ∂L/∂θ_m (the step-m contribution), and their sum is ∇θL."""
    import copy

    copies = [copy.deepcopy(model) for _ in noises]
    x = x0
    for m, (net, noise) in enumerate(zip(copies, noises)):
        x = euler_maruyama_step(x, net, m, schedule=schedule, noise=noise)
    (-reward(x).mean()).backward()
    return torch.stack([c.theta.grad for c in copies])


@pytest.mark.parametrize("adjoint", ["sequential", "pipelined"])
def test_queue_gradient_equals_autograd_through_the_chain_for_a_nonlinear_score(adjoint):
    """θ frozen (SGD, lr 0) so every exited batch's chain is one fixed function of (x₀, ξ, θ):
    each iteration's Γ_k must equal autograd through the recorded batches' full chains, float64
    1e-10. Sequential: Γ_k = Σ_m g^k_m of the batch exiting at k. Pipelined (fill "wait"):
    Γ_k = Σ_m g^{k−(M−1−m)}_m, each step index from a different batch (module docstring). An
    adjoint that reads x_{m+1} in place of x_m fails (checked by hand for both sweeps)."""
    M, iters = 4, 11
    sched = VPSchedule("ou", num_steps=M, T=1.0, t_min=0.0)
    model = NonlinearScore()
    algo = DiffusionQueue(model, euler_maruyama_step, sched, torch.optim.SGD(model.parameters(), lr=0.0),
                          init_fn=lambda g: 1.5 * torch.randn(5, 1, generator=g, dtype=torch.float64),
                          reward_fn=reward, adjoint=adjoint)
    exits = {}  # iteration → (x₀, ξ_0..ξ_{M−1}) of the batch leaving the queue then
    advance = algo._advance

    def recording_advance(generator):
        out = advance(generator)
        if out is not None:
            exits[len(grads)] = (out.states[0].clone(), [n.clone() for n in out.noises])
        return out

    algo._advance = recording_advance
    grads = []
    algo.run(iters, generator=torch.Generator().manual_seed(0),
             callbacks=[lambda k, x, s: grads.append(None if model.theta.grad is None else model.theta.grad.clone())])
    assert torch.equal(model.theta.detach(), torch.tensor([0.4, 1.3], dtype=torch.float64))
    assert sorted(exits) == list(range(M - 1, iters))
    g = {e: per_step_gradients(x0, noises, NonlinearScore(), sched) for e, (x0, noises) in exits.items()}
    checked = 0
    for k, got in enumerate(grads):
        if adjoint == "sequential":
            expected = g[k].sum(0) if k in g else None
        else:  # the full pipelined gradient from iteration 2(M − 1) on, none while filling
            expected = sum(g[k - (M - 1 - m)][m] for m in range(M)) if k >= 2 * (M - 1) else None
        if expected is None:
            assert got is None or not got.any(), f"iteration {k}: a gradient before the queue delivers one"
            continue
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
        checked += 1
    assert checked == (iters - (M - 1) if adjoint == "sequential" else iters - 2 * (M - 1))
