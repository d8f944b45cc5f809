"""Gradients through a finite-horizon sampler: the discrete adjoint method (Marion et al. 2024, §3).

A diffusion sampler runs M steps x_{m+1} = φ_m(x_m, θ, ξ_m), m = 0..M−1, from x_0 with
pre-drawn noises ξ_m, so x_M is a deterministic function of (x_0, ξ, θ). For the loss

    L(θ) = Φ(x_M) + Σ_m c_m(x_m, θ),    Φ(x_M) = −λ (1/B) Σ_i R(x_M,i)  (the reward objective),

the adjoint sweep  a_M = ∇ₓΦ(x_M);  for m = M−1, …, 0:

    g   += (∂θφ_m)ᵀ a_{m+1} + ∇θc_m(x_m, θ),
    a_m  = (∂ₓφ_m)ᵀ a_{m+1} + ∇ₓc_m(x_m, θ)

gives g = ∇θL and a_0 = ∇_{x_0}L. g is the gradient of the surrogate
Σ_m ⟨a_{m+1}, φ_m(x_m, θ)⟩ + c_m(x_m, θ) with x_m and a_{m+1} held fixed (DESIGN.md §2.1).

Two drop-in ways to the same gradient, both adding it to the parameters' ``.grad`` like
``loss.backward()`` and returning a :class:`SamplerGradInfo` (torchdiffeq's ``odeint`` /
``odeint_adjoint`` pattern):

- :func:`adjoint_through_sampler`: forward without a graph, then the sweep builds and frees one
  step's graph at a time. Memory: the stored states, (M+1)·B·d numbers for ``store="states"``,
  or (M/k + k + 1)·B·d for ``store="noise"`` (checkpoints every k steps, then each segment
  recomputed once: M − ⌈M/k⌉ extra steps), plus one step's activations; the noises
  themselves are the caller's (a tensor, or a function ``m -> noise`` that regenerates them).
- :func:`autograd_through_sampler`: plain backprop through the unrolled sampler; the graph of
  all M steps is alive at once.

Every sampler step is called as (``step_kwargs`` passed through, e.g. ``prediction=``)::

    step(x, model, m, *, schedule, noise=noise_m, **step_kwargs) -> x_next  (or (x_next, info))

with x ``(B, *event)``, ``m`` the step index and ``model(x, t)`` the network, t of shape ``(B,)``.
``model`` may be a :class:`~implicit_diffusion.models.diffusion_model.DiffusionModel` (from
:func:`~implicit_diffusion.load_diffusion_model`): its network is called, its schedule is the default
``schedule=`` and its prediction type is passed as ``prediction=`` (a different one is a ``ValueError``).
The sweep calls each step again, so the model must be a deterministic function of (x, t, θ)
(no dropout or train-mode batch norm) and the noises and x_init must not be modified in place
in between.

Example (1-D OU reverse SDE, Euler–Maruyama, score s_θ(x, t) = −(x − θe^{−t})):
    >>> import torch
    >>> from types import SimpleNamespace
    >>> class Score(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.theta = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
    ...     def forward(self, x, t):
    ...         return -(x - self.theta * torch.exp(-t)[:, None])
    >>> def em_step(x, model, m, *, schedule, generator=None, noise=None):
    ...     t, h = schedule.times[m], float(schedule.times[m] - schedule.times[m + 1])
    ...     return x + h * (x + 2 * model(x, t.expand(x.shape[0]))) + (2 * h) ** 0.5 * noise
    >>> sched = SimpleNamespace(times=torch.linspace(1.0, 0.0, 5, dtype=torch.float64))
    >>> x0 = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> noises = torch.randn(4, 8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    >>> reward = lambda x: -(x[:, 0] - 1.0) ** 2
    >>> model = Score()
    >>> info = adjoint_through_sampler(em_step, model, x0, noises, reward, schedule=sched)
    >>> g_adjoint = model.theta.grad.clone(); model.theta.grad = None
    >>> info2 = autograd_through_sampler(em_step, model, x0, noises, reward, schedule=sched)
    >>> bool(torch.allclose(g_adjoint, model.theta.grad, rtol=1e-12))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .._checks import call_user, callable_name, check_values
from ..models.diffusion_model import DiffusionModel, resolve_model

__all__ = [
    "ModelCall",
    "Trajectory",
    "TerminalGrad",
    "SamplerGradInfo",
    "sample_with_trajectory",
    "adjoint_backward",
    "adjoint_step",
    "adjoint_surrogate",
    "terminal_reward_gradient",
    "adjoint_through_sampler",
    "autograd_through_sampler",
]

Step = Callable[..., "Tensor | tuple"]
RunningCost = Callable[[Tensor, int], Tensor]
# Pre-drawn noise: a tensor (M, B, *event), M tensors (B, *event), a function m -> tensor that
# returns the same tensor every time for the same m, or None for deterministic steps (ODE, DDIM).
Noises = Tensor | Sequence[Tensor] | Callable[[int], Tensor] | None
Store = Literal["states", "noise"]


class Trajectory(NamedTuple):
    """A sampled path x_0 → x_M, kept for the adjoint sweep.

    ``states`` holds x_j for j = 0, k, 2k, … and j = M, k = ``stride`` (every state,
    ``(B, *event)`` each, when ``stride == 1``). ``noises`` is the noise source the path was
    drawn with (not copied). Tensors are not copied either: ``x_init`` is the caller's tensor.
    """

    states: tuple[Tensor, ...]
    noises: Noises
    num_steps: int
    stride: int

    @property
    def x_init(self) -> Tensor:
        return self.states[0]

    @property
    def x_final(self) -> Tensor:
        return self.states[-1]

    def stored_indices(self) -> list[int]:
        """The step indices j of ``states``: 0, k, 2k, …, M."""
        return _checkpoint_indices(self.num_steps, self.stride)


class ModelCall(NamedTuple):
    """The network evaluation a sampler step made first on the adjoint's x: ``output = model(x, t)``,
    its graph alive. A running cost marked ``reuses_model_output = True`` receives it as
    ``model_call=`` and may use ``output`` instead of evaluating the network at (x, t) again."""

    x: Tensor
    t: Tensor
    output: Tensor


class _Recording:
    """``model``, recording its first call on exactly ``x`` (the step's own forward, graph included)."""

    def __init__(self, model, x: Tensor):
        self.model, self.x, self.call = model, x, None
        self.display_name = callable_name(model)  # error messages name the user's model

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.model(x, t)
        if self.call is None and x is self.x:
            self.call = ModelCall(x, t, out)
        return out

    def __getattr__(self, name: str):
        return getattr(self.model, name)


class TerminalGrad(NamedTuple):
    """a_M = ∇ₓ(−λ mean_i R(x_M,i)) ``(B, *event)`` and the mean reward (0-d), both detached."""

    grad: Tensor
    reward: Tensor


class SamplerGradInfo(NamedTuple):
    """What a gradient through the sampler reports (all detached).

    ``loss`` = −λ·``reward`` + ``running_cost`` (0-d); ``reward`` the batch-mean reward;
    ``running_cost`` = Σ_m c_m(x_m, θ) (β·KL for :class:`~.girsanov.GirsanovKL`);
    ``x_final`` the samples x_M; ``grad_x_init`` = a_0 = ∇_{x_0} loss.
    """

    loss: Tensor
    reward: Tensor
    running_cost: Tensor
    x_final: Tensor
    grad_x_init: Tensor


def sample_with_trajectory(
    step: Step,
    model: torch.nn.Module | DiffusionModel,
    x_init: Tensor,
    noises: Noises,
    *,
    schedule=None,
    store: Store = "states",
    checkpoint_every: int | None = None,
    num_steps: int | None = None,
    **step_kwargs,
) -> Trajectory:
    """Run the M sampler steps without a graph and keep what the adjoint sweep needs.

    ``store="states"`` keeps all M+1 states: memory (M+1)·B·d, no recomputation.
    ``store="noise"`` keeps x_0, x_M and a checkpoint every k = ``checkpoint_every`` steps
    (default ⌈√M⌉; k ≥ M keeps x_0 and x_M only); the sweep recomputes each segment once from
    its checkpoint and the noises. ``num_steps`` is needed only when ``noises`` is a function
    or ``None``. Shapes: ``x_init`` ``(B, *event)``; ``noises`` ``(M, B, *event)``.
    """
    model, schedule, step_kwargs = _resolve_model(model, schedule, step_kwargs)
    _check_step_kwargs(step_kwargs)
    m_total, noise_at = _resolve_noises(noises, num_steps)
    stride = _stride(store, checkpoint_every, m_total)
    keep = set(_checkpoint_indices(m_total, stride))
    # No graph here: the sweep rebuilds each step's graph itself, one step at a time.
    with torch.no_grad():
        x = x_init.detach()
        states = [x]
        for m in range(m_total):
            x = _call_step(step, x, model, m, schedule, noise_at(m), step_kwargs)
            if m + 1 in keep:
                states.append(x)
    return Trajectory(tuple(states), noises, m_total, stride)


def adjoint_backward(
    step: Step,
    model: torch.nn.Module | DiffusionModel,
    states: Trajectory | Tensor | Sequence[Tensor],
    noises: Noises,
    terminal_grad: Tensor,
    *,
    schedule=None,
    running_cost: RunningCost | None = None,
    params: Iterable[Tensor] | None = None,
    **step_kwargs,
) -> Tensor:
    """The discrete adjoint sweep; adds ∇θL to ``.grad`` of ``params`` and returns a_0 = ∇_{x_0}L.

    a_M = ``terminal_grad`` (∇ₓΦ(x_M), already divided by B if Φ is a batch mean); for
    m = M−1..0, with x_m a fresh leaf, y = φ_m(x_m, θ) and the backward of
    ⟨a_{m+1}, y⟩ + c_m(x_m, θ) accumulate (∂θφ_m)ᵀa_{m+1} + ∇θc_m into ``.grad`` and give
    a_m = (∂ₓφ_m)ᵀa_{m+1} + ∇ₓc_m. Each step's graph is freed before the next is built.

    Args:
        states: a :class:`Trajectory` (its own noises: pass ``noises=None``), or the M+1 states
            as a tensor ``(M+1, B, *event)`` or a sequence.
        running_cost: ``c(x, m) -> 0-d tensor``, differentiable in x and θ.
        params: where the gradient goes; default the model's parameters that require grad.
    """
    model, schedule, step_kwargs = _resolve_model(model, schedule, step_kwargs)
    a_0, _ = _adjoint_sweep(step, model, states, noises, terminal_grad, schedule, running_cost, params, step_kwargs)
    return a_0


def adjoint_surrogate(
    step: Step,
    model: torch.nn.Module | DiffusionModel,
    states: Trajectory | Tensor | Sequence[Tensor],
    noises: Noises,
    terminal_grad: Tensor,
    *,
    schedule=None,
    running_cost: RunningCost | None = None,
    **step_kwargs,
) -> tuple[Tensor, Tensor]:
    """The adjoint gradient as a surrogate loss: returns ``(surrogate, a_0)``.

    surrogate = Σ_m ⟨a_{m+1}, φ_m(x_m, θ)⟩ + Σ_m c_m(x_m, θ) with x_m, a_{m+1} detached, so
    ``surrogate.backward()`` gives the same ∇θL as :func:`adjoint_backward` (through whatever
    hooks the parameters carry: DDP all-reduce, LoRA, clipping). Its value is not the loss.
    Memory: it holds all M step graphs until its backward (like autograd through the sampler);
    prefer :func:`adjoint_backward` where that matters.
    """
    model, schedule, step_kwargs = _resolve_model(model, schedule, step_kwargs)
    traj = _as_trajectory(states, noises)
    _check_step_kwargs(step_kwargs)
    terms = []
    with torch.enable_grad():
        a = _check_terminal(terminal_grad, traj)
        for m, x_m, noise in _states_backward(step, model, traj, schedule, step_kwargs):
            x = x_m.detach().requires_grad_(True)
            part = _step_objective(step, model, m, x, a, noise, schedule, running_cost, step_kwargs)
            # retain_graph: the surrogate's own backward walks this graph again, for θ.
            (a_new,) = torch.autograd.grad(part, x, retain_graph=True, allow_unused=True)
            a = torch.zeros_like(x_m) if a_new is None else a_new
            terms.append(part)
        return torch.stack(terms).sum(), a


def terminal_reward_gradient(reward_fn: Callable[[Tensor], Tensor], x: Tensor, weight: float = 1.0) -> TerminalGrad:
    """a_M = ∇ₓ(−λ (1/B) Σ_i R(x_i)) by autograd, and the mean reward.

    ``x``: ``(B, *event)``; ``reward_fn(x) -> (B,)`` must be differentiable in x (a piecewise
    reward gives its almost-everywhere gradient, blind to the jumps).
    """
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        r = _differentiable_reward(reward_fn, xr)
        (g,) = torch.autograd.grad(r.mean() * -float(weight), xr, allow_unused=True)
    if g is None:
        raise ValueError(f"{_name(reward_fn)} does not depend on x through autograd; ∇R is needed here")
    return TerminalGrad(g, r.detach().mean())


def adjoint_through_sampler(
    step: Step,
    model: torch.nn.Module | DiffusionModel,
    x_init: Tensor,
    noises: Noises,
    reward_fn: Callable[[Tensor], Tensor],
    *,
    schedule=None,
    weight: float = 1.0,
    running_cost: RunningCost | None = None,
    params: Iterable[Tensor] | None = None,
    num_steps: int | None = None,
    store: Store = "states",
    checkpoint_every: int | None = None,
    **step_kwargs,
) -> SamplerGradInfo:
    """∇θ[−λ mean R(x_M) + Σ_m c_m(x_m, θ)] into ``.grad`` by the adjoint sweep.

    Sample without a graph (:func:`sample_with_trajectory`), a_M by
    :func:`terminal_reward_gradient`, then :func:`adjoint_backward`. Same arguments and result
    as :func:`autograd_through_sampler`, plus the storage options.
    """
    model, schedule, step_kwargs = _resolve_model(model, schedule, step_kwargs)
    traj = sample_with_trajectory(
        step, model, x_init, noises, schedule=schedule, store=store,
        checkpoint_every=checkpoint_every, num_steps=num_steps, **step_kwargs,
    )  # fmt: skip
    terminal = terminal_reward_gradient(reward_fn, traj.x_final, weight)
    a_0, cost = _adjoint_sweep(step, model, traj, None, terminal.grad, schedule, running_cost, params, step_kwargs)
    loss = -float(weight) * terminal.reward + cost
    return SamplerGradInfo(loss, terminal.reward, cost, traj.x_final, a_0)


def autograd_through_sampler(
    step: Step,
    model: torch.nn.Module | DiffusionModel,
    x_init: Tensor,
    noises: Noises,
    reward_fn: Callable[[Tensor], Tensor],
    *,
    schedule=None,
    weight: float = 1.0,
    running_cost: RunningCost | None = None,
    params: Iterable[Tensor] | None = None,
    num_steps: int | None = None,
    last_k: int | None = None,
    **step_kwargs,
) -> SamplerGradInfo:
    """The reference: the M steps with grad on, loss = −λ mean R(x_M) + Σ_m c_m, ``backward()``.

    Holds the graph of all M steps at once. Same result as :func:`adjoint_through_sampler`.

    ``last_k`` = K (1 ≤ K ≤ M; default M) is **DRaFT-K** (Clark, Vendrow, Swersky & Fleet, "Directly
    Fine-Tuning Diffusion Models on Differentiable Rewards", ICLR 2024, §4): steps m < M − K run
    without a graph and x_{M−K} is detached, so the loss is backpropagated through the last K
    steps only; the gradient is that of the surrogate (sg: stop-gradient)

        L_K(θ) = −λ mean R(x̃_M) + Σ_{m<M−K} c_m(sg[x_m], θ) + Σ_{m≥M−K} c_m(x̃_m, θ),
        x̃_{M−K} = sg[x_{M−K}],  x̃_{m+1} = φ_m(x̃_m, θ, ξ_m).

    The running cost (the path KL) is still summed over all M steps — for m < M − K at the detached
    x_m (its θ-gradient, one network call, no graph through the sampler) — so the KL penalty holds on
    the whole path, and K = M is exactly the full backprop. With K < M, ``grad_x_init`` is zeros:
    the gradient stops at x_{M−K}. Memory: the graph of K steps.
    """
    model, schedule, step_kwargs = _resolve_model(model, schedule, step_kwargs)
    _check_step_kwargs(step_kwargs)
    m_total, noise_at = _resolve_noises(noises, num_steps)
    params = _resolve_params(model, params)
    first = m_total - check_last_k(last_k, m_total)  # the first step with a graph
    with torch.enable_grad():
        # A leaf of our own (same storage, caller's flags untouched) to read ∇_{x_0} from.
        x0 = x_init.detach().requires_grad_(first == 0)
        x, cost = x0, x0.new_zeros(())
        for m in range(m_total):
            if running_cost is not None:
                cost = cost + _scalar_cost(running_cost(x, m), m)
            if m < first:
                with torch.no_grad():
                    x = _call_step(step, x, model, m, schedule, noise_at(m), step_kwargs)
            else:
                x = _call_step(step, x, model, m, schedule, noise_at(m), step_kwargs)
        reward = _differentiable_reward(reward_fn, x).mean()
        loss = -float(weight) * reward + cost
        loss.backward(inputs=[*([x0] if first == 0 else []), *params])
    a_0 = x0.grad if x0.grad is not None else torch.zeros_like(x0)
    return SamplerGradInfo(loss.detach(), reward.detach(), cost.detach(), x.detach(), a_0)


def check_last_k(last_k, m_total: int) -> int:
    """K of DRaFT-K: an integer in 1..M (None: M, the full backprop)."""
    if last_k is None:
        return m_total
    if isinstance(last_k, bool) or not isinstance(last_k, int) or not 1 <= last_k <= m_total:
        raise ValueError(f"last_k must be an integer from 1 to the number of sampler steps ({m_total}), got "
                         f"{last_k!r}")
    return last_k


# ---------------------------------------------------------------------------------------------
def _resolve_model(model, schedule, step_kwargs):
    """A :class:`~implicit_diffusion.models.diffusion_model.DiffusionModel` → (its network, its schedule unless
    one is given, step_kwargs with its ``prediction``); a bare network passes through (schedule required)."""
    if isinstance(model, DiffusionModel):
        net, schedule, prediction = resolve_model(model, schedule, step_kwargs.get("prediction"))
        return net, schedule, {**step_kwargs, "prediction": prediction}
    if schedule is None:
        raise TypeError("schedule= is required with a bare network (the sampler's time grid); or pass a "
                        "DiffusionModel (implicit_diffusion.load_diffusion_model), which carries its schedule")
    return model, schedule, step_kwargs



def _adjoint_sweep(step, model, states, noises, terminal_grad, schedule, running_cost, params, step_kwargs):
    """Returns (a_0, Σ_m c_m); adds ∇θL into ``.grad``."""
    traj = _as_trajectory(states, noises)
    _check_step_kwargs(step_kwargs)
    params = _resolve_params(model, params)
    cost_total = traj.x_init.new_zeros(())
    with torch.enable_grad():
        a = _check_terminal(terminal_grad, traj)
        for m, x_m, noise in _states_backward(step, model, traj, schedule, step_kwargs):
            a, cost = _vjp_step(step, model, m, x_m, a, noise, schedule, running_cost, params, step_kwargs)
            cost_total = cost_total + cost
    return a, cost_total


def adjoint_step(
    step: Step,
    model: torch.nn.Module | DiffusionModel,
    m: int | Tensor,
    x_m: Tensor,
    a_next: Tensor,
    noise: Tensor | None,
    *,
    schedule=None,
    running_cost: RunningCost | None = None,
    params: Iterable[Tensor] | None = None,
    **step_kwargs,
) -> tuple[Tensor, Tensor]:
    """One backward step of the sweep: adds (∂θφ_m)ᵀa_{m+1} + ∇θc_m to ``.grad`` and returns
    (a_m, c_m) with a_m = (∂ₓφ_m)ᵀa_{m+1} + ∇ₓc_m. ``m`` may be a per-sample index tensor
    ``(B,)`` (the queue algorithm sweeps batches at different steps in one call); the running
    cost then receives that tensor."""
    model, schedule, step_kwargs = _resolve_model(model, schedule, step_kwargs)
    _check_step_kwargs(step_kwargs)
    with torch.enable_grad():
        return _vjp_step(step, model, m, x_m, a_next.detach(), noise, schedule, running_cost,
                         _resolve_params(model, params), step_kwargs)


def _vjp_step(step, model, m, x_m, a_next, noise, schedule, running_cost, params, step_kwargs):
    """One adjoint step. Its graph lives only inside this call (nothing of it is returned).

    A running cost marked ``reuses_model_output`` gets the step's own network output at (x_m, t_m)
    (:class:`ModelCall`): one forward, and one backward through it, serve both terms."""
    x = x_m.detach().requires_grad_(True)  # a fresh leaf: the graph built here stops at x_m
    shares = running_cost is not None and getattr(running_cost, "reuses_model_output", False)
    net = _Recording(model, x) if shares else model
    total = _step_objective(step, net, m, x, a_next, noise, schedule, None, step_kwargs)
    cost = None
    if running_cost is not None:
        cost = _scalar_cost(running_cost(x, m, model_call=net.call) if shares else running_cost(x, m), m)
        total = total + cost
    # inputs=: accumulate into the parameters' .grad (like loss.backward()) and into x.grad.
    total.backward(inputs=[x, *params])
    a = x.grad if x.grad is not None else torch.zeros_like(x_m)
    return a, (x_m.new_zeros(()) if cost is None else cost.detach())


def _step_objective(step, model, m, x, a_next, noise, schedule, running_cost, step_kwargs) -> Tensor:
    """⟨a_{m+1}, φ_m(x, θ)⟩ (+ c_m(x, θ))."""
    y = _call_step(step, x, model, m, schedule, noise, step_kwargs)
    if y.shape != a_next.shape:
        raise ValueError(f"step {m} returned shape {tuple(y.shape)}, the adjoint has shape {tuple(a_next.shape)}")
    total = torch.sum(a_next * y)
    if running_cost is not None:
        total = total + _scalar_cost(running_cost(x, m), m)
    return total


def _states_backward(step, model, traj: Trajectory, schedule, step_kwargs) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield (m, x_m, ξ_m) for m = M−1..0, recomputing each checkpoint segment once (no graph)."""
    _, noise_at = _resolve_noises(traj.noises, traj.num_steps)
    idx = traj.stored_indices()
    for j in reversed(range(len(idx) - 1)):
        lo, hi = idx[j], idx[j + 1]
        segment = [traj.states[j]]
        with torch.no_grad():  # recomputed states are constants of the sweep
            for m in range(lo, hi - 1):
                segment.append(_call_step(step, segment[-1], model, m, schedule, noise_at(m), step_kwargs))
        for m in reversed(range(lo, hi)):
            yield m, segment[m - lo], noise_at(m)
        del segment


def _call_step(step, x, model, m, schedule, noise, step_kwargs) -> Tensor:
    out = step(x, model, m, schedule=schedule, noise=noise, **step_kwargs)
    return out[0] if isinstance(out, tuple) else out


def _as_trajectory(states, noises) -> Trajectory:
    if isinstance(states, Trajectory):
        if noises is not None and noises is not states.noises:
            raise ValueError("a Trajectory carries its own noises: pass noises=None with it")
        return states
    states = tuple(states)
    if len(states) < 2:
        raise ValueError(f"states must hold the M+1 ≥ 2 states x_0..x_M, got {len(states)}")
    m_total, _ = _resolve_noises(noises, len(states) - 1)
    return Trajectory(states, noises, m_total, 1)


def _resolve_noises(noises: Noises, num_steps: int | None):
    """(M, m -> ξ_m) from a noise tensor, a sequence, a function or None."""
    if noises is None or (callable(noises) and not isinstance(noises, Tensor)):
        if num_steps is None:
            raise ValueError("num_steps is required when noises is None or a function m -> noise")
        m_total = int(num_steps)
        noise_at = (lambda m: None) if noises is None else noises
    else:
        m_total = len(noises)
        if num_steps is not None and int(num_steps) != m_total:
            raise ValueError(f"{m_total} noises for {num_steps} steps: need one noise per step")
        noise_at = noises.__getitem__
    if m_total < 1:
        raise ValueError(f"the sampler needs at least one step, got {m_total}")
    return m_total, noise_at


def _checkpoint_indices(m_total: int, stride: int) -> list[int]:
    return [*range(0, m_total, stride), m_total]


def _stride(store, checkpoint_every, m_total) -> int:
    if store == "states":
        if checkpoint_every not in (None, 1):
            raise ValueError("checkpoint_every applies to store='noise'; store='states' keeps every state")
        return 1
    if store == "noise":
        if checkpoint_every is None:
            return max(1, math.ceil(math.sqrt(m_total)))
        if int(checkpoint_every) < 1:
            raise ValueError(f"checkpoint_every must be ≥ 1, got {checkpoint_every}")
        return int(checkpoint_every)
    raise ValueError(f"store must be 'states' or 'noise', got {store!r}")


def _check_step_kwargs(step_kwargs) -> None:
    for key in ("noise", "generator"):
        if key in step_kwargs:
            raise ValueError(
                f"{key}= is not a step option here: the adjoint recomputes steps, so the noise is "
                "pre-drawn and passed as noises=(M, B, *event) (or a function m -> noise)"
            )


def _check_terminal(terminal_grad: Tensor, traj: Trajectory) -> Tensor:
    if terminal_grad.shape != traj.x_final.shape:
        raise ValueError(
            f"terminal_grad must have the samples' shape {tuple(traj.x_final.shape)}, got {tuple(terminal_grad.shape)}"
        )
    return terminal_grad.detach()


def _resolve_params(model, params) -> list[Tensor]:
    if params is None:
        return [p for p in model.parameters() if p.requires_grad]
    params = list(params)
    for i, p in enumerate(params):
        if not (isinstance(p, Tensor) and p.requires_grad):
            raise ValueError(f"params[{i}] must be a tensor with requires_grad=True")
    return params


def _scalar_cost(c, m: int) -> Tensor:
    if not isinstance(c, Tensor) or c.ndim != 0:
        raise ValueError(f"running_cost(x, {m}) must return a 0-d tensor, got {getattr(c, 'shape', type(c))}")
    return c


def _name(reward_fn) -> str:
    return f"reward_fn {getattr(reward_fn, '__name__', type(reward_fn).__name__)}"


def _differentiable_reward(reward_fn, x: Tensor) -> Tensor:
    r = check_values(_name(reward_fn), call_user(_name(reward_fn), reward_fn, x), x)
    if not r.requires_grad:
        raise ValueError(
            f"{_name(reward_fn)} is not differentiable in x (its output has no autograd graph: computed "
            "under no_grad, detached, or from comparisons only). Gradients through the sampler need ∇R: "
            "use a smooth reward (e.g. hexagon_reward_smooth instead of hexagon_reward)."
        )
    return r
