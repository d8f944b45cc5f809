"""Experiment ``rates``: convergence rate of the single loop on a Gaussian problem with exact ∇ℓ.

Potential V(x, θ) = ‖x − θ‖²/(2σ²), so π*(θ) = N(θ, σ²I) and ∇θV(x, θ) = −(x − θ)/σ².
Rewards with closed-form ℓ(θ) = −E_{π*(θ)}[R] (t = ``target``, d = its length):

- ``quadratic``: R(x) = −Σᵢ aᵢ(xᵢ − tᵢ)²  ⇒  ℓ(θ) = Σᵢ aᵢ((θᵢ − tᵢ)² + σ²),  ∇ℓ(θ) = 2a ⊙ (θ − t);
- ``bump``: R(x) = exp(−‖x − t‖²/(2w²)) (bounded, as the theory asks)  ⇒
  ℓ(θ) = −(w²/(w² + σ²))^{d/2} exp(−‖θ − t‖²/(2(w² + σ²))),  ∇ℓ(θ) = −ℓ(θ) (θ − t)/(w² + σ²).

Both have θ* = t. The single loop (Marion et al. 2024, Algorithm 2 and its discrete analysis)
runs one ULA step and one θ step per iteration with Γ_R = Cov_p(R, ∇θV) on the current particles:

    X_{k+1} = X_k − η_k ∇ₓV(X_k, θ_k) + √(2η_k) B_{k+1},    θ_{k+1} = θ_k − λ η_k ε_k Γ_R(p_k, θ_k),

under three step-size rules (λ = ``lr``):

- ``decreasing``: η_k = c/√(k+1), ε_k = 1/√(k+1) (the seeds' bound: (1/K)Σ‖∇ℓ(θ_k)‖² ≤ c₂ ln K/K^{1/3});
- ``constant``: η_k = η, ε_k = 1 (stalls at a noise floor set by the particle count N);
- ``continuous``: η_k = h small and ε_k = min(1, 1/√t_k), t_k = k h: an Euler proxy of the
  continuous-time dynamics, whose bound is (1/T)∫₀ᵀ‖∇ℓ(θ_t)‖² dt ≤ c (ln T)²/T^{1/2}, T = K h.

‖∇ℓ(θ_k)‖² is exact at every k; the running average A_K = (1/K)Σ_{k=1}^{K}‖∇ℓ(θ_k)‖² is fitted
by least squares on log A_K = b + s log K over K ∈ [``fit_from``·K_max, K_max].
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from ..algorithms import SingleLoop
from ..devices import check_device_name, generator_on, resolve_device
from ..errors import ConfigError
from ..metrics import fit_loglog_slope, running_average, tail_average
from ..models import GaussianPotential
from ..models.gaussian_reward import GaussianRewardProblem
from ..objectives import RewardEstimator
from ..runtime.config import explained_errors
from ..runtime.guards import DivergenceGuard
from ..runtime.progress import ProgressBar
from ..runtime.settings import setting
from ..runtime.tables import key_values
from ..runtime.threads import torch_threads
from ..runtime.validation import check, check_fields, positive

__all__ = ["Config", "QUANTITIES", "Result", "RULES", "THEORY_EXPONENTS", "problem", "run", "run_single", "save",
           "step_rules", "table", "time_axis"]

RULES = ("decreasing", "constant", "continuous")
# Exponent of the seeds' upper bounds, log factors aside (K^{-1/3} discrete, T^{-1/2} continuous).
THEORY_EXPONENTS = {"decreasing": -1 / 3, "constant": None, "continuous": -1 / 2}


@explained_errors
@dataclass(frozen=True)
class Config:
    """Settings of the rate study; the defaults run in about a minute on one CPU core."""

    reward: Literal["quadratic", "bump"] = setting("quadratic", "quadratic R(x) = −Σᵢ aᵢ(xᵢ − tᵢ)², or the bounded "
                                                                "bump R(x) = exp(−‖x − t‖²/(2w²))")
    target: tuple[float, ...] = setting((2.0, 1.0), "t = θ*, the reward's centre", allowed="at least one number")
    curvatures: tuple[float, ...] = setting((1.0, 0.1), "aᵢ of the quadratic reward (one per entry of target)",
                                                        allowed="numbers > 0")
    bump_width: float = setting(1.0, "w of the bump reward", allowed="> 0")
    variance: float = setting(1.0, "σ² of π*(θ) = N(θ, σ²I)", allowed="> 0")
    theta0: tuple[float, ...] = setting((0.0, 0.0), "θ at the start (one entry per entry of target)")
    num_particles: int = setting(256, "N, the particles", allowed=">= 2")
    num_steps: int = setting(20000, "K, iterations of each run", unit="iterations", allowed="> 0")
    rules: tuple[str, ...] = setting(RULES, "the step-size rules compared", allowed=RULES)
    step_size: float = setting(0.5, "c in η_k = c/√(k+1) (rule decreasing)", allowed="> 0 and < 2·variance")
    constant_step: float = setting(0.05, "η of rule constant", allowed="> 0 and < 2·variance")
    dt: float = setting(0.05, "h of rule continuous", allowed="> 0 and < 2·variance")
    lr: float = setting(1.0, "λ: θ_{k+1} = θ_k − λ η_k ε_k Γ", allowed="> 0")
    num_seeds: int = setting(3, "seeds per rule: seed, seed + 1, …", allowed="from 1 to 2**20")
    seed: int = setting(0, "random seed")
    fit_from: float = setting(0.05, "fit the slope on K ∈ [fit_from·K_max, K_max]", allowed="in (0, 1)")
    dtype: Literal["float32", "float64"] = setting("float64", "floating-point type of the particles")
    device: str = setting("auto", "where the run computes: auto (CUDA when available, else CPU), cpu, cuda, cuda:N "
                                  "or mps")
    num_threads: int | None = setting(None, "CPU threads of torch; None (the default) = automatic: 1 thread for "
                                            "these small batches",
                                      allowed="None or an integer from 1 to this machine's CPU count")
    progress: bool = setting(True, "show a progress bar on the terminal")

    def __post_init__(self) -> None:
        check_fields(self)  # finite numbers, int64 integers, seed and num_threads bounds (runtime.validation)
        positive(self, "bump_width", "variance", "num_particles", "num_steps", "step_size", "constant_step", "dt",
                 "lr", "num_seeds")
        if self.num_particles < 2:
            raise ConfigError(f"config key 'num_particles' must be >= 2 (Γ_R is a covariance), "
                              f"got {self.num_particles}")
        if not self.target:
            raise ConfigError("config key 'target' must have at least one entry")
        for name in ("theta0", "curvatures"):
            if len(getattr(self, name)) != len(self.target):
                raise ConfigError(f"config key {name!r} must have {len(self.target)} entries (one per entry of "
                                  f"'target'), got {len(getattr(self, name))}")
        check(self, "curvatures", lambda cs: all(c > 0 for c in cs), "numbers > 0", verb="hold")
        bad = [r for r in self.rules if r not in RULES]
        if bad or not self.rules:
            raise ConfigError(f"config key 'rules': unknown {bad or 'empty list'}; allowed: {', '.join(RULES)}")
        # ULA on N(θ, σ²I) is stable only for η < 2σ².
        for name in ("step_size", "constant_step", "dt"):
            if getattr(self, name) >= 2 * self.variance:
                raise ConfigError(f"config key {name!r} must be < 2·variance = {2 * self.variance:g} "
                                  f"(ULA diverges above), got {getattr(self, name)!r}")
        if not 0 < self.fit_from < 1:
            raise ConfigError(f"config key 'fit_from' must be in (0, 1), got {self.fit_from!r}")
        check_device_name(self.device)
        if self.num_seeds > 2**20:  # seeds seed … seed + num_seeds − 1 must stay below torch's 2**64
            raise ConfigError(f"config key 'num_seeds' must be <= {2**20:,}, got {self.num_seeds:,}")

    def memory_estimate(self) -> dict[str, int]:
        """Bytes of the dominant allocations, a rough lower bound (:mod:`~implicit_diffusion.runtime.memory`):
        the particles (x, ∇V, noise, next step); θ_0 … θ_K of every rule and seed, kept in float64 (and
        the running one on the device in ``dtype``)."""
        b, d, k = (4 if self.dtype == "float32" else 8), len(self.target), self.num_steps + 1
        runs = len(self.rules) * self.num_seeds
        return {f"num_particles = {self.num_particles:,} (particles of dimension {d} in {self.dtype})":
                    4 * self.num_particles * d * b,
                f"num_steps = {self.num_steps:,} (θ_0 … θ_K of {runs} runs, dimension {d}, in float64)":
                    runs * k * d * 8 + k * d * b}


def step_rules(config: Config, rule: str) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """(η_k, η_k ε_k) of a rule, as functions of the 0-based iteration k."""
    if rule == "decreasing":
        c = config.step_size
        return (lambda k: c / math.sqrt(k + 1)), (lambda k: c / (k + 1))
    if rule == "constant":
        eta = config.constant_step
        return (lambda k: eta), (lambda k: eta)
    if rule == "continuous":
        h = config.dt
        return (lambda k: h), (lambda k: h * min(1.0, 1.0 / math.sqrt(k * h)) if k > 0 else h)
    raise ValueError(f"unknown rule {rule!r}; allowed: {', '.join(RULES)}")


def problem(config: Config) -> GaussianRewardProblem:
    """The Gaussian problem the config describes."""
    return GaussianRewardProblem(config.reward, config.target, config.curvatures, config.bump_width, config.variance)


def time_axis(config: Config, rule: str) -> tuple[np.ndarray, str]:
    """x-axis of a rule's curve for k = 1..K: K itself, or T = K h for the continuous proxy."""
    k = np.arange(1, config.num_steps + 1, dtype=np.float64)
    return (k * config.dt, "T") if rule == "continuous" else (k, "K")


def run_single(config: Config, rule: str, seed: int, *, estimator=None, bar: ProgressBar | None = None) -> np.ndarray:
    """One single-loop run; returns θ_0 … θ_K, shape ``(K + 1, d)`` (float64).

    Particles start at π*(θ₀) (N(θ₀, σ²I)); ``estimator`` replaces Γ_R (tests use it for
    negative controls).
    """
    dtype, device = getattr(torch, config.dtype), resolve_device(config.device)
    gaussian = problem(config)
    generator = generator_on(device, seed)
    theta0 = torch.tensor(config.theta0, dtype=dtype, device=device)
    potential = GaussianPotential(theta0, variance=config.variance)
    sampler_step, theta_step = step_rules(config, rule)
    # Plain SGD at lr λ, scaled at iteration k by the scheduler's factor η_k ε_k: the θ step is λ η_k ε_k Γ.
    optimizer = torch.optim.SGD(potential.parameters(), lr=config.lr, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, theta_step)
    algo = SingleLoop(potential, estimator or RewardEstimator(gaussian.reward_fn), optimizer,
                      step_size=sampler_step, lr_scheduler=scheduler)
    thetas = torch.empty(config.num_steps + 1, len(config.target), dtype=dtype, device=device)
    thetas[0] = theta0

    def record(k: int, x: torch.Tensor, stats: dict) -> None:
        thetas[k + 1] = potential.mean.detach()

    x = theta0 + math.sqrt(config.variance) * torch.randn(config.num_particles, len(config.target),
                                                          generator=generator, dtype=dtype, device=device)
    guard = DivergenceGuard(potential.parameters(), f"smaller step sizes (step_size now {config.step_size:g}, "
                                                     f"constant_step {config.constant_step:g}, dt {config.dt:g}) "
                                                     f"or lr (now {config.lr:g})")
    algo.run(x, config.num_steps, generator=generator, callbacks=[guard, record] + ([bar] if bar else []))
    return thetas.double().cpu().numpy()


QUANTITIES = ("average", "tail")  # A_K = (1/K)Σ_{k≤K}, B_K = mean over K/2 < k ≤ K


@dataclass
class Result:
    config: Config
    optimum: np.ndarray  # θ*, (d,)
    thetas: dict[str, np.ndarray]  # rule → θ_0..θ_K per seed, (num_seeds, K + 1, d)
    grad_sq: dict[str, np.ndarray]  # rule → ‖∇ℓ(θ_k)‖², k = 1..K, (num_seeds, K)
    # (rule, quantity) → fitted log-log (slope, intercept) per seed, (num_seeds, 2)
    fits: dict[tuple[str, str], np.ndarray]
    wall_time: float

    @property
    def rules(self) -> list[str]:
        return list(self.grad_sq)

    def curve(self, rule: str, quantity: str = "average") -> np.ndarray:
        """A_K (``average``) or B_K (``tail``) per seed, (num_seeds, K)."""
        return (running_average if quantity == "average" else tail_average)(self.grad_sq[rule])

    def slopes(self, rule: str, quantity: str = "average") -> np.ndarray:
        return self.fits[rule, quantity][:, 0]

    def summary(self) -> dict:
        cfg = self.config
        out: dict = {"optimum": self.optimum.tolist(), "fit_range": [cfg.fit_from, 1.0],
                     "fit_range_note": "fraction of the last K (or T)", "rules": {}}
        for rule in self.rules:
            dist = np.linalg.norm(self.thetas[rule][:, -1] - self.optimum, axis=-1)
            entry: dict = {"theory_exponent": THEORY_EXPONENTS[rule]}
            for q in QUANTITIES:
                s = self.slopes(rule, q)
                entry[q] = {"slope_per_seed": s.tolist(), "slope_mean": float(s.mean()),
                            "slope_sd": float(s.std(ddof=1)) if len(s) > 1 else 0.0,
                            "final_per_seed": self.curve(rule, q)[:, -1].tolist()}
            entry["distance_to_optimum_final"] = dist.tolist()
            out["rules"][rule] = entry
        out["wall_time_s"] = self.wall_time
        return out


def run(config: Config, *, metrics_sink: Callable[[list[dict]], None] | None = None) -> Result:
    """Run every rule for every seed; ``metrics_sink`` gets one record per run and a log-spaced trace."""
    with torch_threads(config.num_threads, config.num_particles * len(config.target)):
        return _run(config, metrics_sink or (lambda records: None))


def _run(config: Config, sink: Callable[[list[dict]], None]) -> Result:
    gaussian = problem(config)
    seeds = [config.seed + j for j in range(config.num_seeds)]
    trace = np.unique(np.geomspace(1, config.num_steps, 40).astype(int))
    thetas, grad_sq, fits = {}, {}, {}
    start = time.perf_counter()
    for rule in config.rules:
        axis, _ = time_axis(config, rule)
        runs = []
        for seed in seeds:
            with ProgressBar(config.num_steps, f"{rule} seed {seed}", enabled=config.progress) as bar:
                runs.append(run_single(config, rule, seed, bar=bar))
        thetas[rule] = np.stack(runs)
        grad_sq[rule] = (gaussian.grad(thetas[rule][:, 1:]) ** 2).sum(-1)
        curves = {"average": running_average(grad_sq[rule]), "tail": tail_average(grad_sq[rule])}
        for q, values in curves.items():
            fits[rule, q] = np.array([fit_loglog_slope(axis, v, config.fit_from * axis[-1]) for v in values])
        for j, seed in enumerate(seeds):
            sink([{"rule": rule, "seed": seed, "K": int(k), "avg_grad_sq": float(curves["average"][j, k - 1]),
                   "grad_sq": float(grad_sq[rule][j, k - 1]), "theta": thetas[rule][j, k].tolist()} for k in trace])
            sink([{"rule": rule, "seed": seed, "slope_average": float(fits[rule, "average"][j, 0]),
                   "slope_tail": float(fits[rule, "tail"][j, 0])}])
    return Result(config, gaussian.optimum, thetas, grad_sq, fits, time.perf_counter() - start)


def save(result: Result, run_dir) -> list[str]:
    """Write summary.json, rates.png (log-log A_K with fits and reference lines) and theta.png."""
    from pathlib import Path

    from ..plotting.rates import RateCurves, plot_rates, plot_theta_distance
    from ..runtime.rundir import write_summary

    run_dir = Path(run_dir)
    write_summary(run_dir, result.summary())
    cfg = result.config
    curves = {rule: RateCurves(*time_axis(cfg, rule), result.curve(rule, "average"), result.curve(rule, "tail"),
                               {q: result.fits[rule, q] for q in QUANTITIES}) for rule in result.rules}
    plot_rates(run_dir / "rates.png", curves, fit_from=cfg.fit_from,
               title=f"Single loop on the Gaussian '{cfg.reward}' problem, N = {cfg.num_particles} particles, "
                     f"{cfg.num_seeds} seeds (line: median, band: min–max; fit right of the grey line)")
    plot_theta_distance(run_dir / "theta.png", result.thetas, result.optimum)
    return ["summary.json", "rates.png", "theta.png"]


def table(result: Result) -> str:
    """The terminal summary: fitted slopes (mean ± sd over seeds) beside the theory's exponents."""
    cfg = result.config
    rows = [("fit range", f"K ∈ [{cfg.fit_from:g}·K_max, K_max], K_max = {cfg.num_steps} (T = K·h for "
                          f"'continuous'), {cfg.num_seeds} seeds")]
    for rule in result.rules:
        theory = THEORY_EXPONENTS[rule]
        dist = np.linalg.norm(result.thetas[rule][:, -1] - result.optimum, axis=-1).mean()
        for q, label in (("average", "(1/K)Σ_{k≤K}"), ("tail", "mean over K/2<k≤K")):
            s = result.slopes(rule, q)
            sd = s.std(ddof=1) if len(s) > 1 else 0.0
            rows.append((f"{rule}: slope of {label} ‖∇ℓ‖²", f"{s.mean():+.3f} ± {sd:.3f}   (final "
                         f"{result.curve(rule, q)[:, -1].mean():.3g})"))
        rows.append((f"{rule}: bound exponent, |θ_K − θ*|",
                     f"{'none' if theory is None else f'{theory:+.3f}'}, {dist:.3g}"))
    rows.append(("wall time", f"{result.wall_time:.1f} s"))
    return key_values(rows)
