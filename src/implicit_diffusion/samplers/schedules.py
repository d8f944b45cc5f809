"""Variance-preserving noise schedules and the conversions between prediction kinds.

The forward (noising) process on [0, T] is the variance-preserving SDE

    dX_t = −½ β(t) X_t dt + √β(t) dB_t,    X_t | X_0 ~ N(√ᾱ(t) X_0, σ(t)² I),
    ᾱ(t) = exp(−∫₀ᵗ β(u) du),               σ(t) = √(1 − ᾱ(t)).

Kinds (Song et al. 2021 ICLR, §3.4 and App. B; Marion et al. 2024 §2 for the OU convention):

- ``"ou"``: β ≡ 2, the paper's dX = −X dt + √2 dB, ᾱ(t) = e^{−2t}. T is the horizon; default
  T = 5 (ᾱ(T) = e^{−10} ≈ 4.5e-5, the same terminal level as ``"linear"``).
- ``"linear"``: β(t) = (β_min + (t/T)(β_max − β_min))/T, β_min = 0.1, β_max = 20: the continuous
  version of DDPM's linear β_i ∈ [1e-4, 0.02] over 1000 steps (Ho et al. 2020), ᾱ(T) = e^{−10.05}.
  Default T = 1 (Song et al.'s VP SDE); another T only rescales time.
- ``"cosine"``: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2), s = 0.008 (Nichol & Dhariwal
  2021). Its β(t) = π tan((t/T + s)/(1 + s)·π/2)/((1 + s)T) blows up at t = T, so β is clipped at
  β_max/T from the time t_c where it reaches that value (t_c ≈ 0.90 T for β_max = 20), and ᾱ
  continues as exp(−∫β) with the clipped β: β = −d log ᾱ/dt holds everywhere, and
  ᾱ(T) ≈ 3.3e-3 (raise ``beta_max`` for a smaller one). Default T = 1.

Discretisation: ``times = linspace(T, t_min, M + 1)`` (float64, decreasing); sampling step m goes
from ``times[m]`` to ``times[m + 1]``. Default ``t_min = 1e-3`` (Song et al.'s ε; the model is never
asked for σ(0) = 0, where a score is singular); ``t_min = 0`` is allowed (DDPM/DDIM then end on x̂₀).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "PREDICTIONS",
    "SCHEDULE_KINDS",
    "Prediction",
    "ScheduleKind",
    "VPSchedule",
    "to_epsilon",
    "to_score",
    "to_x0",
]

ScheduleKind = Literal["ou", "linear", "cosine"]
Prediction = Literal["score", "epsilon", "x0"]
SCHEDULE_KINDS: tuple[str, ...] = ("ou", "linear", "cosine")
PREDICTIONS: tuple[str, ...] = ("score", "epsilon", "x0")
_DEFAULT_T = {"ou": 5.0, "linear": 1.0, "cosine": 1.0}


def _as_time(t) -> Tensor:
    """A floating tensor of times (Python numbers become float64)."""
    if not isinstance(t, Tensor):
        return torch.as_tensor(t, dtype=torch.float64)
    return t if t.is_floating_point() else t.to(torch.float64)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Per-sample values ``(B,)`` viewed as ``(B, 1, ..., 1)`` to broadcast over x's event dims."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) if v.ndim else v


@dataclass(frozen=True)
class VPSchedule:
    """A variance-preserving schedule and its M-step time grid (see the module docstring).

    Args:
        kind: ``"ou"``, ``"linear"`` or ``"cosine"``.
        num_steps: M ≥ 1 sampling steps; ``times`` has shape ``(M + 1,)``.
        T: horizon; ``None`` means 5 for ``"ou"`` and 1 otherwise.
        t_min: end of the grid, 0 ≤ t_min < T (default 1e-3).
        beta_min, beta_max: ``"linear"``'s end rates (and ``"cosine"``'s clip at ``beta_max``), in
            units of 1/T.
        cosine_s: the offset s of ``"cosine"``.

    Example:
        >>> s = VPSchedule("ou", num_steps=4, T=1.0, t_min=0.0)
        >>> s.times.tolist()
        [1.0, 0.75, 0.5, 0.25, 0.0]
        >>> round(float(s.alpha_bar(0.5)), 12)  # e^{−1}
        0.367879441171
    """

    kind: ScheduleKind = "ou"
    num_steps: int = 100
    T: float | None = None
    t_min: float = 1e-3
    beta_min: float = 0.1
    beta_max: float = 20.0
    cosine_s: float = 0.008

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; allowed: {', '.join(SCHEDULE_KINDS)}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        if self.T is None:
            object.__setattr__(self, "T", _DEFAULT_T[self.kind])
        if not (isinstance(self.T, (int, float)) and math.isfinite(self.T) and self.T > 0):
            raise ValueError(f"T must be a finite number > 0, got {self.T!r}")
        object.__setattr__(self, "T", float(self.T))
        if not (isinstance(self.t_min, (int, float)) and 0 <= self.t_min < self.T):
            raise ValueError(f"t_min must satisfy 0 <= t_min < T = {self.T}, got {self.t_min!r}")
        if not (0 <= self.beta_min <= self.beta_max and 0 < self.beta_max < math.inf):
            raise ValueError(
                f"need 0 <= beta_min <= beta_max < inf and beta_max > 0, got beta_min={self.beta_min!r}, "
                f"beta_max={self.beta_max!r}"
            )
        if not (0 < self.cosine_s < math.inf):
            raise ValueError(f"cosine_s must be > 0, got {self.cosine_s!r}")
        if self.kind == "cosine" and self._cosine_clip()[0] <= self._cosine_phase0():
            raise ValueError(
                f"beta_max={self.beta_max} is below the cosine schedule's rate at t = 0 "
                f"({math.pi * math.tan(self._cosine_phase0()) / (1 + self.cosine_s):.4g}); allowed: a larger beta_max"
            )

    # -- the cosine schedule's constants ------------------------------------------------------
    def _cosine_phase0(self) -> float:
        return self.cosine_s / (1 + self.cosine_s) * math.pi / 2

    def _cosine_clip(self) -> tuple[float, float]:
        """(φ_c, t_c): the phase and the time where the cosine β reaches β_max/T."""
        s = self.cosine_s
        phi_c = math.atan(self.beta_max * (1 + s) / math.pi)
        return phi_c, self.T * (phi_c * 2 / math.pi * (1 + s) - s)

    def _cosine_phase(self, t: Tensor) -> Tensor:
        """φ(t) = (t/T + s)/(1 + s)·π/2, clamped at φ_c (where the clip takes over)."""
        s = self.cosine_s
        return ((t / self.T + s) / (1 + s) * (math.pi / 2)).clamp(max=self._cosine_clip()[0])

    # -- schedule values ------------------------------------------------------------------------
    def log_alpha_bar(self, t) -> Tensor:
        """log ᾱ(t) = −∫₀ᵗ β(u) du, same shape as ``t`` (accurate where ᾱ ≈ 1 or ᾱ ≈ 0)."""
        t = _as_time(t)
        T = self.T
        if self.kind == "ou":
            return -2.0 * t
        if self.kind == "linear":
            u = t / T
            return -(self.beta_min * u + 0.5 * (self.beta_max - self.beta_min) * u * u)
        phi_c, t_c = self._cosine_clip()
        # The phase is clamped at φ_c so cos stays > 0 (no log 0, no NaN gradient); past t_c the
        # clipped rate β_max/T takes over linearly in log ᾱ. φ(0) goes through the same tensor
        # arithmetic as φ(t), so log ᾱ(0) = 0 exactly; the clamp at 0 guards σ = √(−expm1) from
        # rounding just above 0.
        log_ratio = torch.log(torch.cos(self._cosine_phase(t)) / torch.cos(self._cosine_phase(torch.zeros_like(t))))
        return (2.0 * log_ratio - (self.beta_max / T) * (t - t_c).clamp(min=0.0)).clamp(max=0.0)

    def alpha_bar(self, t) -> Tensor:
        """ᾱ(t) = exp(−∫₀ᵗ β), same shape as ``t``; ᾱ(0) = 1, decreasing."""
        return torch.exp(self.log_alpha_bar(t))

    def beta(self, t) -> Tensor:
        """β(t) = −d log ᾱ(t)/dt, same shape as ``t``."""
        t = _as_time(t)
        if self.kind == "ou":
            return torch.full_like(t, 2.0)
        if self.kind == "linear":
            return (self.beta_min + (t / self.T) * (self.beta_max - self.beta_min)) / self.T
        return math.pi / ((1 + self.cosine_s) * self.T) * torch.tan(self._cosine_phase(t))

    def sigma(self, t) -> Tensor:
        """σ(t) = √(1 − ᾱ(t)) (computed as √(−expm1(log ᾱ)), accurate for small t)."""
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    @property
    def times(self) -> Tensor:
        """The sampling grid, float64 of shape ``(M + 1,)``, from T down to t_min (uniform)."""
        times = torch.linspace(self.T, self.t_min, self.num_steps + 1, dtype=torch.float64)
        times[0], times[-1] = self.T, self.t_min  # exact end points
        return times

    def marginal(self, x0: Tensor, t, noise: Tensor) -> Tensor:
        """x_t = √ᾱ(t) x₀ + σ(t) n: a draw of the forward process at t given x₀ and n ~ N(0, I).

        ``x0``, ``noise``: ``(B, *event)``; ``t``: ``(B,)`` or a scalar.
        """
        t = _as_time(t).to(device=x0.device)
        return _bcast(self.alpha_bar(t).sqrt(), x0) * x0 + _bcast(self.sigma(t), x0) * noise


# -- conversions between prediction kinds (the one place they live) --------------------------


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


def _coefficients(x: Tensor, t, schedule: VPSchedule) -> tuple[Tensor, Tensor]:
    """(√ᾱ(t), σ(t)) broadcast against x, in x's dtype."""
    t = _as_time(t).to(device=x.device, dtype=x.dtype)
    return _bcast(schedule.alpha_bar(t).sqrt(), x), _bcast(schedule.sigma(t), x)


def to_score(pred: Tensor, x: Tensor, t, schedule: VPSchedule, prediction: Prediction) -> Tensor:
    """The score ∇log q_t(x) from a prediction: s = −ε/σ(t) = −(x − √ᾱ(t) x̂₀)/σ(t)².

    ``pred``, ``x``: ``(B, *event)``; ``t``: ``(B,)`` (or a scalar). Singular where σ(t) = 0 for
    ``"epsilon"``/``"x0"``. Reference: Song et al. 2021 ICLR (Tweedie: x̂₀ = (x + σ² s)/√ᾱ).
    """
    _check_prediction(prediction)
    if prediction == "score":
        return pred
    sqrt_ab, sigma = _coefficients(x, t, schedule)
    if prediction == "epsilon":
        return -pred / sigma
    return -(x - sqrt_ab * pred) / sigma**2


def to_epsilon(pred: Tensor, x: Tensor, t, schedule: VPSchedule, prediction: Prediction) -> Tensor:
    """The noise prediction ε̂ = −σ(t) s = (x − √ᾱ(t) x̂₀)/σ(t) (Ho et al. 2020).

    Shapes as :func:`to_score`; singular where σ(t) = 0 for ``"x0"``.
    """
    _check_prediction(prediction)
    if prediction == "epsilon":
        return pred
    sqrt_ab, sigma = _coefficients(x, t, schedule)
    if prediction == "score":
        return -sigma * pred
    return (x - sqrt_ab * pred) / sigma


def to_x0(pred: Tensor, x: Tensor, t, schedule: VPSchedule, prediction: Prediction) -> Tensor:
    """The denoised estimate x̂₀ = (x − σ(t) ε̂)/√ᾱ(t) = (x + σ(t)² s)/√ᾱ(t).

    Tweedie's formula; Song, Meng & Ermon 2021 (DDIM), eq. 12. Shapes as :func:`to_score`.
    """
    _check_prediction(prediction)
    if prediction == "x0":
        return pred
    sqrt_ab, sigma = _coefficients(x, t, schedule)
    if prediction == "epsilon":
        return (x - sigma * pred) / sqrt_ab
    return (x + sigma**2 * pred) / sqrt_ab
