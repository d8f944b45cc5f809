"""KL objectives for Gibbs targets π*(θ) ∝ exp(−V(x, θ)) (Marion et al. 2024, §3).

- :class:`ContrastiveKL`, F(p) = β·KL(p_ref ‖ p) (maximum likelihood / energy-based model
  training, contrastive divergence):
  Γ_ref(p, θ) = β (E_{p_ref}[∇θV] − E_p[∇θV]).
- :class:`KLToReference`, F(p) = β·KL(p ‖ π*(θ₀)):
  Γ_KL(p, θ) = β Cov_p(V(·, θ) − V(·, θ₀), ∇θV),
  so a positive β pulls π*(θ) back toward π*(θ₀). (The authors' JAX code adds this term
  with the opposite sign, which pushes away for β > 0.)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call

from .base import Estimator, Surrogate

__all__ = ["ContrastiveKL", "KLToReference"]


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
        w = torch.full((x.shape[0],), -self.weight / x.shape[0], dtype=x.dtype, device=x.device)
        return Surrogate((self.reference, x), (self._ref_weights, w), {})


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
            h_mean = h.mean()
            w = (h - h_mean).mul_(self.weight / max(x.shape[0] - 1, 1))
        return Surrogate((x,), (w,), {"energy_gap": h_mean})
