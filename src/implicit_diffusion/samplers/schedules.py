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
- ``"discrete"``: a table ``alphas_cumprod`` = (ᾱ_0, …, ᾱ_{N−1}) of a discrete-time model (a
  diffusers scheduler's own ``alphas_cumprod``, Ho et al. 2020), placed at t_n = (n + 1)T/N, with
  ᾱ(0) = 1. log ᾱ is linear in t between grid points, so ᾱ(t_n) = ᾱ_n exactly and β is piecewise
  constant, β = (N/T)·log(ᾱ_{n−1}/ᾱ_n) on (t_{n−1}, t_n] with t_{−1} = 0, ᾱ_{−1} = 1 (the
  continuous form of the discrete β_n = 1 − ᾱ_n/ᾱ_{n−1}); at a grid point β is the rate of the
  interval ending there, the one a reverse step from it crosses. Default T = 1, t_min = 0.

Discretisation: ``spacing="uniform"`` (the only one for the closed-form kinds):
``times = linspace(T, t_min, M + 1)`` (float64, decreasing); sampling step m goes from ``times[m]``
to ``times[m + 1]``. Default ``t_min = 1e-3`` (Song et al.'s ε; the model is never asked for
σ(0) = 0, where a score is singular); ``t_min = 0`` is allowed (DDPM/DDIM then end on x̂₀).
``time_power`` ρ ≠ 1 bends the uniform grid, ``times[m] = t_min + (T − t_min)(1 − m/M)^ρ``: with
ρ > 1 the steps shrink towards t_min, where the score changes fastest (the polynomial grid of
Karras et al. 2022, eq. 5, here in t; on N(0, 0.1²) data with the exact score, Euler–Maruyama at
M = 20 on the linear schedule gives sd 0.264 on the uniform grid and 0.113 at ρ = 2).
``"discrete"`` defaults to ``spacing="leading"``; it and ``"trailing"``, ``"linspace"`` pick the M
training indices i_0 > … > i_{M−1} as diffusers' ``set_timesteps`` does (Lin et al. 2024, Table 2;
``steps_offset`` is added for ``"leading"``), ``times = ((i_m + 1)T/N)_m`` followed by t_min: every
step starts on a grid point, as diffusers' DDPM/DDIM steps do, and the last one ends on t_min
(0: on x̂₀, like diffusers' last step to ᾱ = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PREDICTIONS",
    "SCHEDULE_KINDS",
    "Prediction",
    "SPACINGS",
    "ScheduleKind",
    "Spacing",
    "VPSchedule",
    "to_epsilon",
    "to_score",
    "to_x0",
]

ScheduleKind = Literal["ou", "linear", "cosine", "discrete"]
Prediction = Literal["score", "epsilon", "x0"]
Spacing = Literal["uniform", "leading", "trailing", "linspace"]
# The closed-form kinds (what a training run can pick by name); "discrete" needs a table.
SCHEDULE_KINDS: tuple[str, ...] = ("ou", "linear", "cosine")
PREDICTIONS: tuple[str, ...] = ("score", "epsilon", "x0")
SPACINGS: tuple[str, ...] = ("uniform", "leading", "trailing", "linspace")
_KINDS = (*SCHEDULE_KINDS, "discrete")
_DEFAULT_T = {"ou": 5.0, "linear": 1.0, "cosine": 1.0, "discrete": 1.0}


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
        kind: ``"ou"``, ``"linear"``, ``"cosine"`` or ``"discrete"``.
        num_steps: M ≥ 1 sampling steps; ``times`` has shape ``(M + 1,)``.
        T: horizon; ``None`` means 5 for ``"ou"`` and 1 otherwise.
        t_min: end of the grid, 0 ≤ t_min < T; ``None`` means 1e-3, and 0 for ``"discrete"``.
        beta_min, beta_max: ``"linear"``'s end rates (and ``"cosine"``'s clip at ``beta_max``), in
            units of 1/T.
        cosine_s: the offset s of ``"cosine"``.
        alphas_cumprod: ``"discrete"`` only: ᾱ_0 > … > ᾱ_{N−1}, all in (0, 1) (any sequence of
            numbers; kept as a tuple of floats, so the schedule stays hashable and JSON-ready).
        spacing: how ``times`` is placed: ``"uniform"`` (the closed-form kinds' only one), or for
            ``"discrete"`` diffusers' ``"leading"`` (its default), ``"trailing"``, ``"linspace"``.
        steps_offset: added to the training indices by ``"leading"`` (diffusers' ``steps_offset``).
        time_power: ρ > 0 of the uniform spacing's grid t_min + (T − t_min)(1 − m/M)^ρ (1: linspace).

    Example:
        >>> s = VPSchedule("ou", num_steps=4, T=1.0, t_min=0.0)
        >>> s.times.tolist()
        [1.0, 0.75, 0.5, 0.25, 0.0]
        >>> round(float(s.alpha_bar(0.5)), 12)  # e^{−1}
        0.367879441171
        >>> d = VPSchedule("discrete", num_steps=2, alphas_cumprod=[0.9, 0.5, 0.2, 0.1])  # N = 4
        >>> d.timesteps.tolist(), d.times.tolist()  # "leading": indices 2, 0 at t = 3/4, 1/4; then t_min
        ([2, 0], [0.75, 0.25, 0.0])
        >>> round(float(d.alpha_bar(0.75)), 12), round(float(d.alpha_bar(0.625)), 12)  # ᾱ_2; √(ᾱ_1 ᾱ_2)
        (0.2, 0.316227766017)
    """

    kind: ScheduleKind = "ou"
    num_steps: int = 100
    T: float | None = None
    t_min: float | None = None
    beta_min: float = 0.1
    beta_max: float = 20.0
    cosine_s: float = 0.008
    alphas_cumprod: tuple[float, ...] | None = None
    spacing: Spacing | None = None
    steps_offset: int = 0
    time_power: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; allowed: {', '.join(_KINDS)}")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")
        if self.T is None:
            object.__setattr__(self, "T", _DEFAULT_T[self.kind])
        if not (isinstance(self.T, (int, float)) and math.isfinite(self.T) and self.T > 0):
            raise ValueError(f"T must be a finite number > 0, got {self.T!r}")
        object.__setattr__(self, "T", float(self.T))
        if self.t_min is None:
            object.__setattr__(self, "t_min", 0.0 if self.kind == "discrete" else 1e-3)
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
        self._check_table_and_spacing()

    def __reduce__(self):
        # Pickled and copied from the fields alone: the derived tables below are caches (some on a GPU).
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))

    # -- the discrete kind's table and grid ---------------------------------------------------
    def _check_table_and_spacing(self) -> None:
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; allowed: {', '.join(SPACINGS)}")
        if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise ValueError(f"steps_offset must be an integer >= 0, got {self.steps_offset!r}")
        if self.kind != "discrete":
            if self.alphas_cumprod is not None:
                raise ValueError(f"alphas_cumprod is for kind 'discrete' only, got it with kind {self.kind!r}")
            if self.spacing not in (None, "uniform"):
                raise ValueError(f"spacing {self.spacing!r} needs kind 'discrete' (a training grid); "
                                 f"allowed for kind {self.kind!r}: uniform")
            object.__setattr__(self, "spacing", "uniform")
        else:
            self._set_table()
            if self.spacing is None:
                object.__setattr__(self, "spacing", "leading")
        if isinstance(self.time_power, bool) or not (isinstance(self.time_power, (int, float))
                                                     and 0 < self.time_power < math.inf):
            raise ValueError(f"time_power must be a finite number > 0, got {self.time_power!r}")
        object.__setattr__(self, "time_power", float(self.time_power))
        if self.time_power != 1.0 and self.spacing != "uniform":
            raise ValueError(f"time_power={self.time_power:g} bends the uniform grid; spacing {self.spacing!r} "
                             f"takes the training grid's points (allowed: time_power = 1)")
        if self.steps_offset and self.spacing != "leading":
            raise ValueError(f"steps_offset={self.steps_offset} needs spacing 'leading', got {self.spacing!r}")
        if self.spacing != "uniform":
            self._set_grid()

    def _set_table(self) -> None:
        table = self.alphas_cumprod
        if table is None:
            raise ValueError("kind 'discrete' needs alphas_cumprod, the table ᾱ_0 > … > ᾱ_{N−1} in (0, 1)")
        try:
            table = tuple(float(a) for a in table)
        except (TypeError, ValueError):
            raise ValueError(f"alphas_cumprod must be a sequence of numbers, got {type(self.alphas_cumprod).__name__}"
                             ) from None
        bad = next((n for n, a in enumerate(table) if not (0 < a < (table[n - 1] if n else 1.0))), None)
        if not table or bad is not None:
            raise ValueError("alphas_cumprod must be a non-empty, strictly decreasing sequence in (0, 1)"
                             + (f"; entry {bad} is {table[bad]!r}" if table else ", got an empty one"))
        object.__setattr__(self, "alphas_cumprod", table)
        # Entry j: log ᾱ at t = jT/N, j = 0..N (0 at t = 0, then log ᾱ_{j−1}); float64, and a copy per
        # (device, dtype) made on first use.
        log_table = torch.tensor([0.0, *(math.log(a) for a in table)], dtype=torch.float64)
        object.__setattr__(self, "_log_tables", {(log_table.device, torch.float64): log_table})

    def _set_grid(self) -> None:
        """The training indices i_0 > … > i_{M−1} as diffusers' ``set_timesteps`` computes them (numpy,
        the same expressions, so the rounding is the same), and ``times`` from them."""
        N, M = len(self.alphas_cumprod), self.num_steps
        if M > N:
            raise ValueError(f"num_steps={M} is more than the {N} training steps that spacing {self.spacing!r} "
                             f"picks from; allowed: num_steps <= {N}, or spacing 'uniform'")
        if self.spacing == "linspace":
            idx = np.linspace(0, N - 1, M).round()[::-1].astype(np.int64)
        elif self.spacing == "leading":
            idx = (np.arange(0, M) * (N // M)).round()[::-1].astype(np.int64) + self.steps_offset
        else:
            idx = np.round(np.arange(N, 0, -N / M)).astype(np.int64) - 1
        if idx.shape != (M,) or idx[0] >= N or (M > 1 and not (np.diff(idx) < 0).all()):
            raise ValueError(f"spacing {self.spacing!r} with steps_offset={self.steps_offset} gives training "
                             f"indices {idx.tolist()[:4]}… for num_steps={M} of {N}; "
                             f"allowed: {M} distinct indices < {N}")
        last = float(idx[-1] + 1) / N * self.T
        if not self.t_min < last:
            raise ValueError(f"t_min={self.t_min!r} must lie below the last grid time {last!r} "
                             f"(training index {int(idx[-1])})")
        times = torch.cat([torch.from_numpy(idx + 1).to(torch.float64) / N * self.T,
                           torch.tensor([float(self.t_min)], dtype=torch.float64)])
        object.__setattr__(self, "_grid", (torch.from_numpy(idx), times))

    def _log_table(self, like: Tensor) -> Tensor:
        """The log ᾱ table, ``(N + 1,)``, entry j at t = jT/N, in ``like``'s dtype and device."""
        key = (like.device, like.dtype)
        if key not in self._log_tables:
            self._log_tables[key] = self._log_tables[(torch.device("cpu"), torch.float64)].to(like.device, like.dtype)
        return self._log_tables[key]

    def _interval(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log ᾱ table, u = tN/T, k): u lies in (k, k + 1], k clamped to [0, N − 1] (so the end
        intervals extend linearly past 0 and T).

        A u within rounding of an integer j counts as j, in (j − 1, j]: a grid time in float32 is off
        by up to ~6e-8·j in u, and β must be the rate of the interval below it all the same.
        """
        table = self._log_table(t)
        n = table.numel() - 1
        u = t * (n / self.T)
        slack = min(4 * torch.finfo(t.dtype).eps * n, 0.25)
        k = (torch.ceil(u.detach() - slack).long() - 1).clamp(0, n - 1)  # an index: no gradient to carry
        return table, u, k

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
        if self.kind == "discrete":
            # Written from the right end point, so log ᾱ(t_{k+1}) is the table entry exactly (and
            # log ᾱ(0) = 0 exactly: k = 0, u = 0 gives L₁ − L₁).
            table, u, k = self._interval(t)
            return table[k + 1] - (k + 1 - u) * (table[k + 1] - table[k])
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
        if self.kind == "discrete":  # (N/T)·log(ᾱ_k/ᾱ_{k+1}) on the interval (t_k, t_{k+1}] holding t
            table, _, k = self._interval(t)
            return (table[k] - table[k + 1]) * ((table.numel() - 1) / self.T)
        if self.kind == "linear":
            return (self.beta_min + (t / self.T) * (self.beta_max - self.beta_min)) / self.T
        return math.pi / ((1 + self.cosine_s) * self.T) * torch.tan(self._cosine_phase(t))

    def sigma(self, t) -> Tensor:
        """σ(t) = √(1 − ᾱ(t)) (computed as √(−expm1(log ᾱ)), accurate for small t)."""
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    @property
    def times(self) -> Tensor:
        """The sampling grid, float64 of shape ``(M + 1,)``, decreasing to t_min: from T, uniform (bent
        by ``time_power``), or
        for ``"discrete"`` with a diffusers spacing the grid times (i_m + 1)T/N of :attr:`timesteps`."""
        if self.spacing != "uniform":
            return self._grid[1].clone()  # a fresh tensor: the caller may write to it
        if self.time_power == 1.0:
            times = torch.linspace(self.T, self.t_min, self.num_steps + 1, dtype=torch.float64)
        else:
            u = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
            times = self.t_min + (self.T - self.t_min) * (1 - u) ** self.time_power
        times[0], times[-1] = self.T, self.t_min  # exact end points
        return times

    @property
    def timesteps(self) -> Tensor:
        """``"discrete"`` with a diffusers spacing: the training indices i_0 > … > i_{M−1}, int64 of
        shape ``(M,)``, that diffusers' ``set_timesteps(M)`` picks; step m starts at ᾱ_{i_m}."""
        if self.spacing == "uniform":
            raise ValueError(f"timesteps need kind 'discrete' with spacing leading, trailing or linspace; "
                             f"this schedule is {self.kind!r} with spacing 'uniform'")
        return self._grid[0].clone()

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
