"""KL objectives for Gibbs targets π*(θ) ∝ exp(−V(x, θ)) (Marion et al. 2024, §3).

- :class:`ContrastiveKL`, F(p) = β·KL(p_ref ‖ p) (maximum likelihood / energy-based model
  training, contrastive divergence):
  Γ_ref(p, θ) = β (E_{p_ref}[∇θV] − E_p[∇θV]).
- :class:`KLToReference`, F(p) = β·KL(p ‖ π*(θ₀)):
  Γ_KL(p, θ) = β Cov_p(V(·, θ) − V(·, θ₀), ∇θV),
  so a positive β pulls π*(θ) back toward π*(θ₀). (The authors' JAX code adds this term
  with the opposite sign, which pushes away for β > 0.)
- :class:`MinibatchContrastiveKL`: Γ_ref with a fresh data minibatch at every call (energy-based
  model training, Marion et al. 2024, Algorithm 2 with F(p) = KL(p_data ‖ p)), plus an optional
  energy penalty α(E_data[V²] + E_p[V²]) (Du & Mordatch 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call

from ..distributed import global_count, global_mean, world_size
from .base import Estimator, Surrogate

__all__ = ["ContrastiveKL", "KLToReference", "MinibatchContrastiveKL"]


class ContrastiveKL(Estimator):
    """Γ_ref for β·KL(p_ref ‖ π*(θ)) from reference samples ``reference`` ``(n_ref, dim)``.

    Surrogate: β[(1/n_ref) Σⱼ V(x_refⱼ, θ) − (1/N) Σᵢ V(xᵢ, θ)].
    """

    def __init__(self, reference: Tensor, weight: float = 1.0):
        if reference.ndim != 2 or reference.shape[0] == 0:
            raise ValueError(f"reference must have shape (n_ref, dim) with n_ref > 0, got {tuple(reference.shape)}")
        self.reference = reference.detach()
        self.weight = float(weight)
        self._ref_weights = torch.full(
            (reference.shape[0],), self.weight / reference.shape[0], dtype=reference.dtype, device=reference.device
        )

    def __call__(self, potential, x: Tensor) -> Surrogate:
        # sharded particles: N is global, and every process holds the reference (its weight splits W ways)
        n, world = global_count(x.shape[0], x.device), world_size()
        w = torch.full((x.shape[0],), -self.weight / n, dtype=x.dtype, device=x.device)
        ref_w = self._ref_weights / world if world > 1 else self._ref_weights
        return Surrogate((self.reference, x), (ref_w, w), {})


class KLToReference(Estimator):
    """Γ_KL for β·KL(π*(θ) ‖ π*(θ₀)); θ₀ is a frozen copy of the potential's parameters now.

    Surrogate: Σᵢ wᵢ V(xᵢ, θ) with wᵢ = β(hᵢ − h̄)/(N−1), hᵢ = V(xᵢ, θ) − V(xᵢ, θ₀) (detached):
    the unbiased sample covariance.
    Reports h̄ as ``stats["energy_gap"]``.
    """

    def __init__(self, potential: torch.nn.Module, weight: float = 1.0):
        self.weight = float(weight)
        self.reference_state = {k: v.detach().clone() for k, v in potential.state_dict().items()}

    def reference_energy(self, potential, x: Tensor) -> Tensor:
        """V(x, θ₀), shape ``(num_particles,)``."""
        return functional_call(potential, self.reference_state, (x,))

    def __call__(self, potential, x: Tensor) -> Surrogate:
        with torch.no_grad():
            h = potential(x) - self.reference_energy(potential, x)
            n = global_count(x.shape[0], x.device)  # over all processes when particles are sharded
            h_mean = global_mean(h, n)
            w = (h - h_mean).mul_(self.weight / max(n - 1, 1))
        return Surrogate((x,), (w,), {"energy_gap": h_mean})


class MinibatchContrastiveKL(Estimator):
    """Γ_ref for β·KL(p_data ‖ π*(θ)) on a data minibatch drawn at each call, with an optional energy penalty.

    At every call, B = ``batch_size`` indices are drawn uniformly with replacement,
    ``torch.randint(0, n_data, (B,), generator=generator)``, giving y₁ … y_B from ``data``
    ``(n_data, dim)``; with particles x₁ … x_N the objective's surrogate is

        β[(1/B) Σ_b V(y_b, θ) − (1/N) Σᵢ V(xᵢ, θ)] + α[(1/B) Σ_b V(y_b, θ)² + (1/N) Σᵢ V(xᵢ, θ)²],

    written as Σⱼ wⱼ V(zⱼ, θ) with fixed weights w_b = (β + 2αV(y_b))/B and wᵢ = (−β + 2αV(xᵢ))/N
    (V detached), which has the same θ-gradient. α = ``energy_penalty`` keeps the energies of data
    and particles near 0 (Du & Mordatch 2019, "Implicit generation and modeling with energy-based models");
    α = 0 gives Γ_ref exactly.
    Statistics: ``energy_data`` and ``energy_particles`` (mean energies) and their difference
    ``energy_gap`` (data − particles; negative while the particles sit higher on the energy than the data).

    Example:
        >>> import torch
        >>> from implicit_diffusion.models import GaussianPotential
        >>> V = GaussianPotential(torch.zeros(1, dtype=torch.float64))
        >>> data = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
        >>> est = MinibatchContrastiveKL(data, 4, generator=torch.Generator().manual_seed(0))
        >>> s = est(V, torch.zeros(2, 1, dtype=torch.float64))
        >>> len(s.points), s.weights[0].sum().item(), s.weights[1].sum().item()
        (2, 1.0, -1.0)
    """

    def __init__(self, data: Tensor, batch_size: int, *, generator: torch.Generator, weight: float = 1.0,
                 energy_penalty: float = 0.0):
        if data.ndim != 2 or data.shape[0] == 0:
            raise ValueError(f"data must have shape (n_data, dim) with n_data > 0, got {tuple(data.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if energy_penalty < 0:
            raise ValueError(f"energy_penalty must be >= 0, got {energy_penalty}")
        if not isinstance(generator, torch.Generator):
            raise ValueError("MinibatchContrastiveKL needs generator=torch.Generator() to draw its minibatches")
        self.data = data.detach()
        self.batch_size = int(batch_size)
        self.generator = generator
        self.weight = float(weight)
        self.energy_penalty = float(energy_penalty)

    def draw_batch(self) -> Tensor:
        """The next minibatch ``(batch_size, dim)`` (advances the generator)."""
        idx = torch.randint(0, self.data.shape[0], (self.batch_size,), generator=self.generator,
                            device=self.generator.device)
        return self.data[idx.to(self.data.device)]

    def __call__(self, potential, x: Tensor) -> Surrogate:
        y = self.draw_batch()
        n, world = global_count(x.shape[0], x.device), world_size()  # sharded: each process its own minibatch
        with torch.no_grad():
            vy, vx = potential(y), potential(x)
            wy = (self.weight + 2.0 * self.energy_penalty * vy) / (y.shape[0] * world)
            wx = (-self.weight + 2.0 * self.energy_penalty * vx) / n
            ey, ex = global_mean(vy), global_mean(vx, n)
        return Surrogate((y, x), (wy, wx), {"energy_data": ey, "energy_particles": ex, "energy_gap": ey - ex})
