"""Potentials V(x, θ): energies of Gibbs targets π*(θ) ∝ exp(−V(x, θ)).

A potential is a :class:`torch.nn.Module` whose parameters are θ and whose
``forward(x)`` maps particles ``x`` of shape ``(num_particles, dim)`` to energies of
shape ``(num_particles,)``. Two methods let samplers and estimators use closed forms
where a potential has them, with autograd as the fallback for any user module:

- ``grad_x(x)`` → ∇ₓV(x, θ), shape ``(num_particles, dim)``;
- ``accumulate_param_grad(points, weights)`` adds Σᵢ wᵢ ∇θV(yᵢ, θ) to each parameter's
  ``.grad``: the gradient of the surrogate loss Σᵢ wᵢ V(yᵢ, θ) with the weights and points
  held fixed (every Gibbs-family estimator of Marion et al. 2024, §3, has this form).

Reference: P. Marion et al., *Implicit Diffusion: Efficient Optimization through
Stochastic Sampling*, arXiv 2402.05468 (AISTATS 2025), §2 and §5.1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import call_user, callable_name, check_values

__all__ = [
    "Potential",
    "FunctionPotential",
    "ModulePotential",
    "GaussianPotential",
    "EnergyMLP",
    "as_potential",
    "grid_density",
    "autograd_energy_grad",
]

Params = Tensor | Mapping[str, Tensor]


class Potential(nn.Module):
    """Base class: energy V(x, θ) with θ = ``self.parameters()``.

    Subclasses implement ``forward(x) -> (num_particles,)``; they may override
    :meth:`grad_x` and :meth:`accumulate_param_grad` with closed forms.
    """

    def __init__(self) -> None:  # nn.Module's is (*args, **kwargs): say that a Potential takes nothing
        super().__init__()

    def grad_x(self, x: Tensor) -> Tensor:
        """∇ₓV(x, θ) by autograd, shape ``(num_particles, dim)``.

        When the caller has grad mode on, the result stays differentiable (the graph is
        created), so a sampler step built on it can be differentiated w.r.t. θ and x.
        Under ``torch.no_grad()`` it is a plain tensor and no parameter gradient is touched.
        """
        return autograd_energy_grad(self, x)

    def accumulate_param_grad(self, points: Tensor, weights: Tensor) -> None:
        """Add Σᵢ wᵢ ∇θV(yᵢ, θ) to ``p.grad`` for every parameter p.

        ``points``: ``(n, dim)``, ``weights``: ``(n,)``; both are treated as constants.
        This is ``backward()`` of the surrogate ``Σᵢ wᵢ V(yᵢ, θ)``.
        """
        with torch.enable_grad():
            points = points.detach()
            name = f"potential {callable_name(self)}"
            energies = check_values(name, call_user(name, self, points), points)  # finite at the particles
            (weights.detach() * energies).sum().backward()


def autograd_energy_grad(energy_fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """∇ₓ Σᵢ V(xᵢ) by autograd for any ``energy_fn(x) -> (num_particles,)``.

    With grad mode on (the caller differentiates through the step) the graph is kept
    (``create_graph=True``); under ``torch.no_grad()`` the result is a plain tensor and no
    parameter's ``.grad`` is touched.
    """
    if torch.is_grad_enabled():
        xr = x if x.requires_grad else x.detach().requires_grad_(True)
        return torch.autograd.grad(_energies(energy_fn, xr).sum(), xr, create_graph=True)[0]
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        return torch.autograd.grad(_energies(energy_fn, xr).sum(), xr)[0]


def _energies(energy_fn, x: Tensor) -> Tensor:
    name = f"potential {callable_name(energy_fn)}"
    # +inf energies are allowed here (a hard constraint at a rejected MALA proposal), NaN is not
    return check_values(name, call_user(name, energy_fn, x), x, finite="allow +inf")


class ModulePotential(Potential):
    """Wrap any ``nn.Module`` with ``forward(x) -> (num_particles,)`` as a potential."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    @property
    def display_name(self) -> str:
        return type(self.module).__name__

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)


class FunctionPotential(Potential):
    """Wrap a plain function ``fn(x, params) -> (num_particles,)`` and its parameters.

    ``params`` is a tensor (stored as the parameter ``theta``) or a mapping of names to
    tensors (stored in a ``ParameterDict`` and passed to ``fn`` as a dict).
    """

    def __init__(self, fn: Callable[[Tensor, Params], Tensor], params: Params):
        super().__init__()
        self.fn = fn
        if isinstance(params, Tensor):
            self.theta = nn.Parameter(params.detach().clone())
            self._is_dict = False
        elif isinstance(params, Mapping):
            self.theta = nn.ParameterDict(
                {k: nn.Parameter(v.detach().clone()) for k, v in params.items()}
            )
            self._is_dict = True
        else:
            raise TypeError(
                f"params must be a Tensor or a mapping of names to Tensors, got {type(params).__name__}"
            )

    @property
    def display_name(self) -> str:
        return callable_name(self.fn)

    def forward(self, x: Tensor) -> Tensor:
        params = dict(self.theta.items()) if self._is_dict else self.theta
        return self.fn(x, params)


def as_potential(obj: Potential | nn.Module | Callable, params: Params | None = None) -> Potential:
    """Turn a user object into a :class:`Potential`.

    - a :class:`Potential` is returned as is;
    - an ``nn.Module`` whose ``forward(x)`` returns energies is wrapped (θ = its parameters);
    - a function ``fn(x, params)`` needs ``params`` (a tensor or dict of tensors).
    """
    if isinstance(obj, Potential):
        if params is not None:
            raise ValueError("params must be None when a Potential module is given: θ are its parameters")
        return obj
    if isinstance(obj, nn.Module):
        if params is not None:
            raise ValueError("params must be None when an nn.Module is given: θ are its parameters")
        return ModulePotential(obj)
    if callable(obj):
        if params is None:
            raise ValueError("a plain function potential fn(x, params) needs params (a Tensor or dict)")
        return FunctionPotential(obj, params)
    raise TypeError(f"expected a Potential, an nn.Module or a function fn(x, params), got {type(obj).__name__}")


class GaussianPotential(Potential):
    """V(x, μ) = ‖x − μ‖² / (2σ²): π*(μ) = N(μ, σ²I), with learnable mean μ of shape ``(dim,)``."""

    def __init__(self, mean: Tensor, variance: float = 1.0):
        super().__init__()
        if variance <= 0:
            raise ValueError(f"variance must be > 0, got {variance}")
        self.mean = nn.Parameter(torch.as_tensor(mean).detach().clone())
        self.variance = float(variance)

    def forward(self, x: Tensor) -> Tensor:
        return ((x - self.mean) ** 2).sum(-1) / (2 * self.variance)

    def grad_x(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.variance

    def accumulate_param_grad(self, points: Tensor, weights: Tensor) -> None:
        # ∇μV(y) = −(y − μ)/σ²
        with torch.no_grad():
            w = weights.detach()
            g = (w.sum() * self.mean - w @ points.detach()) / self.variance
            _add_grad(self.mean, g)


class EnergyMLP(Potential):
    """Energy-based model: V(x, θ) = MLP_θ(x), a fully connected SiLU network with scalar output."""

    def __init__(self, dim: int, hidden: int = 64, depth: int = 2):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden and depth must be >= 1, got {dim}, {hidden}, {depth}")
        layers: list[nn.Module] = []
        width = dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1)

    def reset_parameters(self, generator: torch.Generator) -> EnergyMLP:
        """Redraw θ from ``generator`` with ``nn.Linear``'s default law, U(±1/√fan_in) for every
        weight and bias, layer by layer (the default initialisation draws from the global RNG,
        which library code never touches). Returns ``self``."""
        with torch.no_grad():
            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    for p in (layer.weight, layer.bias):
                        p.copy_((torch.rand(p.shape, generator=generator, dtype=p.dtype, device=p.device) * 2 - 1)
                                * bound)
        return self


def grid_density(energy: Callable[[Tensor], Tensor], lo: Sequence[float], hi: Sequence[float],
                 size: int) -> np.ndarray:
    """exp(−V) of a 2-D potential on a ``size`` × ``size`` grid over [lo, hi], normalised so that
    Σ p · cell area = 1; shape ``(size, size)``, row i at the i-th value of the second coordinate.

    ``energy`` maps points ``(size², 2)`` (float64) to energies ``(size²,)``; evaluated without
    gradients.

    >>> p = grid_density(lambda x: 0.5 * (x**2).sum(-1), (-6.0, -6.0), (6.0, 6.0), 121)
    >>> round(float(p.max()), 4)  # 1/(2π) at the mode of N(0, I)
    0.1592
    """
    xs, ys = np.linspace(lo[0], hi[0], size), np.linspace(lo[1], hi[1], size)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
    with torch.no_grad():
        v = energy(torch.from_numpy(grid)).numpy()
    p = np.exp(-(v - v.min()))
    return (p / (p.sum() * cell)).reshape(size, size)


def _add_grad(p: Tensor, g: Tensor) -> None:
    if p.grad is None:
        p.grad = g.detach()  # g is freshly computed: no aliasing
    else:
        p.grad.add_(g)
