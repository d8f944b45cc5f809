"""The pipelined queue's edges: the fill (``fill``), the tail (``tail``, ``drain``) and the
staleness of its adjoint steps, checked exactly (float64) against per-step gradients computed
independently by autograd through the exited batches' stored trajectories.

Indexing used throughout: with M sampling steps the queue's first batch exits at iteration
M − 1; exited batch i (0-based, in exit order) exits at e_i = M − 1 + i, and its pipelined
adjoint step m runs at e_i + M − 1 − m, contributing g_{i,m} = (∂θφ_m)ᵀ a_{m+1} to that
iteration's θ update.
"""

from __future__ import annotations

import pytest
import torch
from conftest import same_tensors

from implicit_diffusion.algorithms.diffusion_base import DiffusionAlgorithm
from implicit_diffusion.algorithms.queue import DiffusionQueue
from implicit_diffusion.runtime.checkpoints import load_checkpoint, save_checkpoint
from implicit_diffusion.samplers.diffusion import euler_maruyama_step
from implicit_diffusion.samplers.schedules import VPSchedule

LAMBDA = 1.5  # reward weight: a_M = −λ ∇ₓ mean R


class Score(torch.nn.Module):
    """s_θ(x, t) = −(x − θ₀e^{−t}) − θ₁ t tanh(x): two parameters, nonlinear in x (so a_m
    depends on the trajectory), θ enters every step."""

    prediction = "score"

    def __init__(self, theta=(0.3, -0.2)):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x, t):
        t = t.to(x.dtype)[:, None]
        return -(x - self.theta[0] * torch.exp(-t)) - self.theta[1] * t * torch.tanh(x)


def reward(x):
    return -((x[:, 0] - 2.0) ** 2)


def make(M, *, lr=0.1, batch=3, step=euler_maruyama_step, init=None, weight=LAMBDA, **options):
    sched = VPSchedule("ou", num_steps=M, T=1.0, t_min=0.0)
    model = Score()
    init = init or (lambda g: torch.randn(batch, 1, generator=g, dtype=torch.float64))
    algo = DiffusionQueue(model, step, sched, torch.optim.SGD(model.parameters(), lr=lr), init_fn=init,
                          reward_fn=reward, reward_weight=weight, **options)
    return model, algo


def record_exits(algo):
    """The batches leaving the queue, in exit order: (x_0, [ξ_0..ξ_{M−1}]) each."""
    exits, advance = [], algo._advance

    def recording(generator):
        f = advance(generator)
        if f is not None:
            exits.append((f.states[0].clone(), [n.clone() for n in f.noises]))
        return f

    algo._advance = recording
    return exits


def record_updates(algo):
    """The gradient Γ each applied θ update used (flattened), in order."""
    grads, update = [], algo._update

    def recording():
        if any(p.grad is not None for p in algo.params):
            grads.append(torch.cat([p.grad.flatten() for p in algo.params]).clone())
        update()

    algo._update = recording
    return grads


def step_contributions(algo, x0, noises, theta):
    """g_m, m = 0..M−1, for one batch at a fixed θ, by autograd: the unrolled sampler with a
    separate leaf copy of θ in each step, so ∂loss/∂θ^{(m)} is step m's contribution alone.
    ``(M, 2)``."""
    models = [Score(theta.tolist()) for _ in noises]
    x = x0
    for m, (model, noise) in enumerate(zip(models, noises)):
        x = euler_maruyama_step(x, model, m, schedule=algo.schedule, noise=noise)
    loss = -LAMBDA * reward(x).mean()
    return torch.stack(torch.autograd.grad(loss, [model.theta for model in models]))


def run(algo, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(k):
        algo.step(i, generator=g)
    return g


# --- (a) the fill ---------------------------------------------------------------------------

@pytest.mark.parametrize("M", [3, 5])
def test_wait_holds_theta_until_the_gradient_is_complete(M):
    """fill="wait": θ stays θ₀ through iteration 2(M − 1) − 1 although batches exit from M − 1 on
    (their rewards are reported); the first update, at 2(M − 1), is θ₀ − η Σ_i g_{i, m=i}: one
    step index from each of the first M batches, each index once. Controls: that update is not
    the partial gradient of the first exits nor one batch's full gradient."""
    model, algo = make(M, fill="wait", adjoint="pipelined")
    exits = record_exits(algo)
    theta0 = model.theta.detach().clone()
    g = torch.Generator().manual_seed(1)
    for k in range(2 * (M - 1)):
        stats = algo.step(k, generator=g)
        assert ("reward" in stats) == (k >= M - 1)
        assert torch.equal(model.theta.detach(), theta0), k
    algo.step(2 * (M - 1), generator=g)
    assert len(exits) == M
    g_im = torch.stack([step_contributions(algo, x0, n, theta0) for x0, n in exits])  # (batch i, m, 2)
    complete = sum(g_im[i, i] for i in range(M))
    torch.testing.assert_close(model.theta.detach(), theta0 - 0.1 * complete, rtol=1e-10, atol=1e-13)
    for wrong in (g_im[0, M - 1], g_im[M - 1].sum(0)):
        assert (complete - wrong).abs().max() > 1e-3


def test_partial_applies_the_first_exits_step_alone():
    """fill="partial": the first update, at the first exit (M − 1), is θ₀ − η g_{0, M−1}, the
    last step of the first batch only (a partial gradient)."""
    M = 4
    model, algo = make(M, fill="partial", adjoint="pipelined")
    exits = record_exits(algo)
    theta0 = model.theta.detach().clone()
    g = run(algo, M - 1)
    assert torch.equal(model.theta.detach(), theta0) and not exits
    algo.step(M - 1, generator=g)
    g0 = step_contributions(algo, *exits[0], theta0)
    torch.testing.assert_close(model.theta.detach(), theta0 - 0.1 * g0[M - 1], rtol=1e-10, atol=1e-13)
    assert (g0[M - 1] - g0.sum(0)).abs().max() > 1e-3  # control: not the batch's full gradient


# θ after each of 12 iterations of the pipelined queue (M = 4, batch 3, λ = 1, SGD η = 0.1, seed 0), from
# the code before `fill` existed: a regression guard that "partial" is the old behaviour.
PARTIAL_REFERENCE = [
    [0.3, -0.2], [0.3, -0.2], [0.3, -0.2],
    [0.4786623252333163, -0.18568980447201555], [0.7397825736478018, -0.17564518398144688],
    [1.0077422021794533, -0.16754239207779328], [1.2744692050196147, -0.1259690004458968],
    [1.4393835265278554, -0.11837385265762072], [1.6010722242479114, -0.0981751573646927],
    [1.778348343883214, -0.06871656452467091], [1.8927715297116892, -0.07651296693502356],
    [2.0263916421281296, -0.06355821664062655],
]


def test_partial_reproduces_the_trajectory_before_the_option():
    model, algo = make(4, fill="partial", adjoint="pipelined", weight=1.0)
    g, out = torch.Generator().manual_seed(0), []
    for k in range(12):
        algo.step(k, generator=g)
        out.append(model.theta.detach().clone())
    torch.testing.assert_close(torch.stack(out), torch.tensor(PARTIAL_REFERENCE, dtype=torch.float64),
                               rtol=1e-12, atol=1e-14)
    _, waiting = make(4, adjoint="pipelined", weight=1.0)  # the default, "wait", differs from iteration 3 on
    run(waiting, 4)
    assert not torch.equal(waiting.model.theta.detach(), out[3])


# --- (b) the accounting invariant, θ frozen ----------------------------------------------------

@pytest.mark.parametrize("fill, tail", [("partial", "apply"), ("wait", "drop"), ("wait", "apply"),
                                        ("partial", "drop")])
def test_every_batch_step_is_counted_once_or_reported_missing(fill, tail):
    """SGD with η = 0 keeps θ = θ₀ exactly, so every contribution g_{i,m} is the same function
    of batch i whenever it is computed. Over K = 11 iterations of M = 4 (n = 8 exited batches):

    - the sequential queue's updates sum to Σ_{i,m} g_{i,m} (each batch's full gradient);
    - the pipelined queue's updates (plus drain's) sum to that minus exactly the contributions
      it leaves out: with "wait" the fill's, g_{i,m} with m > i (M(M − 1)/2 = 6 of them), with
      "drop" the tail's, those whose iteration e_i + M − 1 − m > K − 1 (6, what
      pending_contributions() reports before drain);
    - the number of updates: K − (M − 1) ("partial") or K − 2(M − 1) ("wait"), plus M − 1
      drain updates with "apply" (drain's return value)."""
    M, K = 4, 11
    model, seq = make(M, lr=0.0, adjoint="sequential", fill=fill, tail=tail)
    seq_exits, seq_grads = record_exits(seq), record_updates(seq)
    run(seq, K)
    assert (seq.pending_contributions(), seq.drain()) == (0, 0)  # no-ops for the sequential adjoint
    theta0 = model.theta.detach()
    g_im = torch.stack([step_contributions(seq, x0, n, theta0) for x0, n in seq_exits])
    n = len(seq_exits)
    assert n == K - (M - 1) == len(seq_grads)
    torch.testing.assert_close(sum(seq_grads), g_im.sum((0, 1)), rtol=1e-10, atol=1e-13)

    _, pipe = make(M, lr=0.0, adjoint="pipelined", fill=fill, tail=tail)
    pipe_exits, pipe_grads = record_exits(pipe), record_updates(pipe)
    run(pipe, K)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(seq_exits, pipe_exits, strict=True))  # same batches
    fill_missing = {(i, m) for i in range(n) for m in range(M) if m > i}
    tail_missing = {(i, m) for i in range(n) for m in range(M) if M - 1 + i + M - 1 - m > K - 1}
    assert len(fill_missing) == len(tail_missing) == M * (M - 1) // 2
    assert pipe.pending_contributions() == len(tail_missing)
    fill_updates = len(pipe_grads)
    drained = pipe.drain()
    assert drained == (M - 1 if tail == "apply" else 0) == len(pipe_grads) - fill_updates
    assert fill_updates == K - (2 if fill == "wait" else 1) * (M - 1)
    assert pipe.pending_contributions() == (0 if tail == "apply" else len(tail_missing))

    missing = (fill_missing if fill == "wait" else set()) | (tail_missing if tail == "drop" else set())
    expected = g_im.sum((0, 1)) - sum((g_im[i, m] for i, m in missing), torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(sum(pipe_grads), expected, rtol=1e-10, atol=1e-13)
    if missing:  # control: the left-out contributions are not negligible
        assert (expected - g_im.sum((0, 1))).abs().max() > 1e-3


# --- (c) staleness ------------------------------------------------------------------------------

@pytest.mark.parametrize("adjoint", ["pipelined", "sequential"])
def test_staleness_is_twice_m_minus_1_minus_m_pipelined_and_m_minus_1_minus_m_sequential(adjoint):
    """Each batch carries its entry iteration b as a tag in a second coordinate that the step
    leaves unchanged; the step records when (iteration k) it runs step m of batch b, forward
    (no grad) or adjoint (grad), and the θ it sees. With exit e = b + M − 1:
    forward step m at e − (M − 1) + m, adjoint step m at e + M − 1 − m (pipelined) or e
    (sequential), i.e. the adjoint's θ is 2(M − 1 − m), resp. M − 1 − m, iterations newer. Both
    kinds of call see θ_k, the θ of the iteration they run in (fill="partial": θ changes from
    the first exit on, so a wrong θ would show)."""
    M, K = 4, 14
    clock, log = [0], []

    def tagged_step(x, model, m, *, schedule, noise, prediction="score", generator=None):
        y = euler_maruyama_step(x[:, :1], model, m, schedule=schedule, noise=noise[:, :1], prediction=prediction)
        m = m if isinstance(m, torch.Tensor) else torch.full((x.shape[0],), m)
        log.append((torch.is_grad_enabled(), clock[0], m.tolist(), x[:, 1].detach().tolist(),
                    score.theta.detach().clone()))
        return torch.cat([y, x[:, 1:]], 1)

    entered = [0]

    def tagged_init(g):
        x = torch.randn(2, 2, generator=g, dtype=torch.float64)
        x[:, 1] = entered[0]
        entered[0] += 1
        return x

    score, algo = make(M, step=tagged_step, init=tagged_init, adjoint=adjoint, fill="partial")
    thetas, g = [], torch.Generator().manual_seed(0)
    for k in range(K):
        clock[0] = k
        thetas.append(score.theta.detach().clone())
        algo.step(k, generator=g)
    ran = {"forward": {}, "adjoint": {}}
    for grad, k, ms, tags, theta in log:
        assert torch.equal(theta, thetas[k])  # every call uses the θ of its own iteration
        for m, b in zip(ms, tags):
            ran["adjoint" if grad else "forward"].setdefault((int(b), m), set()).add(k)
    assert set(ran["adjoint"]) <= set(ran["forward"])
    done = 0
    for (b, m), ks in ran["adjoint"].items():
        e = b + M - 1
        (k_adj,), (k_fwd,) = ks, ran["forward"][(b, m)]  # each step runs once each way
        assert k_fwd == e - (M - 1) + m
        assert k_adj == (e + M - 1 - m if adjoint == "pipelined" else e)
        assert k_adj - k_fwd == (2 if adjoint == "pipelined" else 1) * (M - 1 - m)
        done += m == 0
    assert done == K - (2 if adjoint == "pipelined" else 1) * (M - 1)  # batches whose sweep finished
    assert not torch.equal(thetas[M], thetas[-1])  # θ moved: the θ check is not of a constant


# --- (d) options --------------------------------------------------------------------------------

def test_bad_fill_or_tail_names_the_value_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"fill must be 'wait' or 'partial', got 'full'"):
        make(3, fill="full")
    with pytest.raises(ValueError, match=r"tail must be 'drop' or 'apply', got 'flush'"):
        make(3, tail="flush")
    _, algo = make(3)
    assert (algo.fill, algo.tail) == ("wait", "drop")


# --- (e) checkpoint mid-fill --------------------------------------------------------------------

def test_resume_mid_fill_continues_bit_for_bit(tmp_path):
    """M = 4, fill="wait": saved after 5 iterations (2 exits, 2 adjoints in flight, θ = θ₀ still),
    through a checkpoint file, loaded into a fresh queue; both run 7 more iterations (the first
    update at iteration 6): θ and the queue's whole state agree bit for bit. The fill's
    condition is the number of in-flight adjoints, which the checkpoint holds. Control: the same
    state loaded into a fill="partial" queue updates at iteration 5 and ends elsewhere."""
    M = 4
    model, a = make(M, adjoint="pipelined", fill="wait")
    theta0 = model.theta.detach().clone()
    g = run(a, 5)
    assert torch.equal(model.theta.detach(), theta0) and len(a.adjoints) == 2
    tensors, meta = a.state()
    save_checkpoint(tmp_path / "c.safetensors", {**tensors, "g": g.get_state()}, meta)
    tensors, meta = load_checkpoint(tmp_path / "c.safetensors")

    def resumed(**options):
        _, b = make(M, adjoint="pipelined", **options)
        b.load_state(tensors, meta)
        h = torch.Generator()
        h.set_state(tensors["g"])
        for k in range(5, 12):
            b.step(k, generator=h)
        return b

    for k in range(5, 12):
        a.step(k, generator=g)
    b = resumed(fill="wait")
    assert torch.equal(a.model.theta, b.model.theta)
    assert not torch.equal(a.model.theta.detach(), theta0)
    assert same_tensors(a.state()[0], b.state()[0])
    c = resumed(fill="partial")
    assert not torch.equal(a.model.theta, c.model.theta)
    d = make(M, adjoint="pipelined", fill="wait")[1]  # control: θ restored, the queue not
    DiffusionAlgorithm.load_state(d, tensors, meta)
    h = torch.Generator()
    h.set_state(tensors["g"])
    for k in range(5, 12):
        d.step(k, generator=h)
    assert not torch.equal(a.model.theta, d.model.theta)
