"""Experiment ``hyperparameter``: tune a regularization strength e^θ against validation loss.

Bilevel problem on a real bundled data set (scikit-learn), float64, full batches (deterministic):

    min_θ ℓ(θ) = f(x*(θ)),  x*(θ) = argmin_x g(x, θ),  g(x, θ) = training loss(x) + (e^θ/2)‖x‖²,

f = validation loss. ``problem = "ridge"``: ``load_diabetes`` (442 × 10), squared loss, closed form
x*(θ) = (AᵀA/n + e^θ I)⁻¹Aᵀb/n. ``problem = "logistic"``: ``load_breast_cancer`` (569 × 30 plus an
unpenalised intercept), logistic loss; x*(θ) by Newton's method to machine precision. Features
(and the ridge target) are standardised with training statistics; the split is random with ``seed``.

Methods (:mod:`implicit_diffusion.algorithms.bilevel`): the joint single loop (one inner gradient
step, one warm-started CG step, one θ step per iteration) against the nested baseline (inner
gradient descent to a tolerance, CG to a tolerance, one θ step), with the same θ optimizer. The
reference θ* is the best point of a dense grid of the exact ℓ, refined by bisection on the sign of the
exact ℓ′(θ) (dense linear algebra). The comparison: inner iterations (gradient steps on x) each method
needs until ℓ(θ_k) stays within ``reach_tol`` of the nested baseline's final value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..algorithms import JointBilevel, NestedBilevel, make_optimizer
from ..devices import check_device_name, resolve_device
from ..errors import ConfigError
from ..models.regression import Problem, load_problem, minimize_1d
from ..runtime.config import explained_errors
from ..runtime.progress import ProgressBar
from ..runtime.settings import setting
from ..runtime.tables import columns
from ..runtime.threads import torch_threads
from ..runtime.validation import check_fields, nonnegative, positive

__all__ = ["HyperparameterConfig", "HyperparameterResult", "Trace", "run", "save", "table"]


@explained_errors
@dataclass(frozen=True)
class HyperparameterConfig:
    """Settings; the defaults run both methods on ridge in about 15 s (shared 2-core CPU)."""

    problem: Literal["ridge", "logistic"] = setting("ridge", "ridge (diabetes, closed-form inner solution) or "
                                                             "logistic (breast cancer, Newton inner solves)")
    theta0: float = setting(0.0, "log regularization strength θ at the start")
    train_fraction: float = setting(0.5, "fraction of the data in the training split (the rest: validation)",
                                         allowed="in (0, 1)")
    num_updates: int = setting(2000, "θ updates of the single loop", unit="θ updates", allowed="> 0")
    inner_steps_per_update: int = setting(1, "S, inner gradient steps per single-loop iteration",
                                             unit="inner steps", allowed="> 0")
    cg_steps: int = setting(1, "CG steps per single-loop iteration (warm-started)", allowed="> 0")
    inner_step_size: float | None = setting(None, "η, the step of gradient descent on x; None (the default): "
                                                  "1/(L_data + e^{max(θ₀, θ*)}), L_data the data term's curvature "
                                                  "bound", allowed="> 0")
    outer_lr: float = setting(30.0, "θ step (SGD learning rate, or Adam's), the same for both methods", allowed="> 0")
    optimizer: Literal["sgd", "adam"] = setting("sgd", "the θ optimizer of both methods")
    nested_updates: int = setting(40, "θ updates of the nested baseline", allowed="> 0")
    nested_inner_tol: float = setting(1e-6, "stop inner gradient descent at ‖∇ₓg‖ ≤ this", allowed=">= 0")
    nested_max_inner_steps: int = setting(20000, "at most this many inner gradient steps per nested update",
                                                 unit="inner steps", allowed="> 0")
    nested_cg_tol: float = setting(1e-8, "stop CG at ‖∇²g v − ∇f‖ ≤ this", allowed=">= 0")
    nested_max_cg_steps: int = setting(200, "at most this many CG steps per nested update",
                                            unit="CG steps", allowed="> 0")
    nested_warm_start: bool = setting(True, "continue x and v from the previous update (False: restart both)")
    reach_tol: float = setting(1e-3, "a method has \"reached\" the target from update k on when ℓ(θ_j) ≤ "
                                     "ℓ_nested,final + reach_tol·(ℓ(θ₀) − ℓ_nested,final) for all j ≥ k",
                                     allowed=">= 0")
    grid_min: float = setting(-12.0, "lower end of the θ grid of the reference optimum", allowed="< grid_max")
    grid_max: float = setting(6.0, "upper end of the θ grid of the reference optimum", allowed="> grid_min")
    grid_points: int = setting(361, "points of the θ grid of the reference optimum", allowed=">= 3")
    seed: int = setting(0, "random seed of the train/validation split")
    num_threads: int = setting(1, "CPU threads of torch", allowed="an integer from 1 to this machine's CPU count")
    device: str = setting("auto", "the algorithms' device (auto: CUDA when available, else CPU; cpu, cuda, cuda:N, "
                                  "mps); the exact references are computed on the CPU")
    progress: bool = setting(True, "show a progress bar on the terminal")

    def __post_init__(self) -> None:
        check_fields(self)  # finite numbers, int64 integers, seed and num_threads bounds (runtime.validation)
        positive(self, "num_updates", "inner_steps_per_update", "cg_steps", "outer_lr", "nested_updates",
                 "nested_max_inner_steps", "nested_max_cg_steps")
        nonnegative(self, "nested_inner_tol", "nested_cg_tol", "reach_tol")
        if not 0 < self.train_fraction < 1:
            raise ConfigError(f"config key 'train_fraction' must be in (0, 1), got {self.train_fraction!r}")
        if self.inner_step_size is not None and not self.inner_step_size > 0:
            raise ConfigError(f"config key 'inner_step_size' must be > 0, or None (omit the key) for the automatic "
                              f"step, got {self.inner_step_size!r}")
        if not math.isfinite(self.theta0):
            raise ConfigError(f"config key 'theta0' must be a finite number, got {self.theta0!r}")
        if not self.grid_min < self.grid_max:
            raise ConfigError(
                f"config keys 'grid_min' < 'grid_max' required, got {self.grid_min!r} and {self.grid_max!r}")
        if self.grid_points < 3:
            raise ConfigError(f"config key 'grid_points' must be >= 3, got {self.grid_points!r}")
        check_device_name(self.device)
        if self.num_threads < 1:
            raise ConfigError(f"config key 'num_threads' must be >= 1, got {self.num_threads!r}")

    def memory_estimate(self) -> dict[str, int]:
        """Bytes of the dominant allocations, a rough lower bound (:mod:`~implicit_diffusion.runtime.memory`):
        the six recorded values of every θ update (Python floats in lists, then numpy arrays, about 40 bytes
        each) and the reference grid."""
        return {f"num_updates = {self.num_updates:,} (six values recorded per update)": 240 * self.num_updates,
                f"nested_updates = {self.nested_updates:,} (six values recorded per update)": 240 * self.nested_updates,
                f"grid_points = {self.grid_points:,} (the reference grid)": 16 * self.grid_points}


@dataclass
class Trace:
    """One method's path, one entry per θ update plus the start: θ_k, exact ℓ(θ_k), cumulative work."""

    theta: np.ndarray
    value: np.ndarray  # ℓ(θ_k) = f(x*(θ_k)), exact
    outer_at_iterate: np.ndarray  # entry k+1: f(x) at the inner iterate update k used (NaN at the start)
    inner_steps: np.ndarray  # cumulative gradient steps on x
    hvps: np.ndarray  # cumulative Hessian-vector products
    wall: np.ndarray  # cumulative seconds in the algorithm's steps (exact evaluations excluded)

    @property
    def wall_time(self) -> float:
        return float(self.wall[-1])

    def reached_at(self, target: float, *, iterate: bool = False) -> int | None:
        """First index from which on ℓ(θ_k) stays ≤ target (None if the last entry is above it): a
        path that only crosses the target on its way (an overshoot) has not reached it. With
        ``iterate``, the same for f(x) at the method's own inner iterate (the x that update used)."""
        values = self.outer_at_iterate if iterate else self.value
        above = np.nonzero(~(values <= target))[0]  # NaN (the start, for iterates) counts as above
        last = int(above[-1]) if len(above) else -1
        return None if last == len(values) - 1 else last + 1


@dataclass
class HyperparameterResult:
    config: HyperparameterConfig
    theta0: float
    theta_star: float  # reference optimum of the exact ℓ
    value_star: float
    value_theta0: float
    inner_step_size: float
    reference: str  # how θ* was found
    traces: dict[str, Trace] = field(default_factory=dict)

    @property
    def target(self) -> float:
        """The nested baseline's final ℓ plus ``reach_tol`` of its total decrease."""
        final = float(self.traces["nested"].value[-1])
        return final + self.config.reach_tol * (self.value_theta0 - final)

    def summary(self) -> dict:
        out = {"problem": self.config.problem, "theta0": self.theta0, "theta_star": self.theta_star,
               "value_star": self.value_star, "value_theta0": self.value_theta0, "target": self.target,
               "inner_step_size": self.inner_step_size, "reference": self.reference, "methods": {}}
        for name, tr in self.traces.items():
            i = tr.reached_at(self.target)
            j = tr.reached_at(self.target, iterate=True)
            out["methods"][name] = {
                "theta_final": float(tr.theta[-1]), "value_final": float(tr.value[-1]),
                "theta_updates": len(tr.theta) - 1, "inner_steps": int(tr.inner_steps[-1]), "hvps": int(tr.hvps[-1]),
                "inner_steps_to_target": None if i is None else int(tr.inner_steps[i]),
                "hvps_to_target": None if i is None else int(tr.hvps[i]),
                "updates_to_target": i, "wall_time_s": tr.wall_time,
                "inner_steps_to_target_iterate": None if j is None else int(tr.inner_steps[j]),
                "wall_time_to_target_s": None if i is None else float(tr.wall[i]),
            }
        return out


def run(config: HyperparameterConfig, *,
        metrics_sink: Callable[[list[dict]], None] | None = None) -> HyperparameterResult:
    """Reference optimum, then the single loop and the nested baseline from the same θ₀ and x₀ = 0."""
    with torch_threads(config.num_threads, 0):
        return _run(config, metrics_sink or (lambda records: None))


def _run(config: HyperparameterConfig, sink) -> HyperparameterResult:
    problem = load_problem(config.problem, train_fraction=config.train_fraction, seed=config.seed)
    theta0 = config.theta0
    lo, hi, points = config.grid_min, config.grid_max, config.grid_points
    theta_star = minimize_1d(problem.value, lo, hi, points, tol=1e-12, derivative=problem.derivative)
    eta = config.inner_step_size or 1.0 / (problem.curvature_bound() + math.exp(max(theta0, theta_star)))
    reference = "closed-form ℓ(θ)" if config.problem == "ridge" else "exact inner solves (Newton, ‖step‖∞ ≤ 1e-13)"
    reference += f": grid of {points} on [{lo:g}, {hi:g}], then bisection on the exact ℓ′(θ)"
    result = HyperparameterResult(config, theta0, theta_star, problem.value(theta_star), problem.value(theta0), eta,
                                  reference)
    d, device = problem.A.shape[1], resolve_device(config.device)
    on_device = problem.to(device)  # what the algorithms see; the exact ℓ(θ_k) is evaluated on the CPU
    for name in ("single loop", "nested"):
        theta = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64, device=device))
        optimizer = make_optimizer(config.optimizer, [theta], config.outer_lr, foreach=False)
        if name == "single loop":
            algo = JointBilevel(on_device.inner_loss, on_device.outer_loss, theta, optimizer, step_size=eta,
                                inner_steps_per_update=config.inner_steps_per_update, cg_steps=config.cg_steps)
            steps = config.num_updates
        else:
            algo = NestedBilevel(on_device.inner_loss, on_device.outer_loss, theta, optimizer, step_size=eta,
                                 inner_tol=config.nested_inner_tol, max_inner_steps=config.nested_max_inner_steps,
                                 cg_tol=config.nested_cg_tol, max_cg_steps=config.nested_max_cg_steps,
                                 warm_start=config.nested_warm_start)
            steps = config.nested_updates
        result.traces[name] = _trace(name, algo, problem, torch.zeros(d, dtype=torch.float64, device=device), steps,
                                     config, sink)
    return result


def _trace(name: str, algo, problem: Problem, x0: Tensor, steps: int, config: HyperparameterConfig, sink) -> Trace:
    theta0 = float(algo.theta.detach())
    rows = {"theta": [theta0], "value": [problem.value(theta0)], "outer": [float("nan")], "inner": [0], "hvps": [0],
            "wall": [0.0]}
    state = {"x_star": problem.solve(theta0), "eval_time": 0.0, "start": 0.0}

    def record(k: int, x: Tensor, stats: dict) -> None:
        start = time.perf_counter()
        rows["wall"].append(start - state["start"] - state["eval_time"])
        th = float(algo.theta.detach())
        if not abs(th) < 50:  # e^θ beyond 1e21 (or NaN): the θ steps diverged
            raise ConfigError(
                f"{name}: θ diverged to {th:g} at update {k + 1}; lower 'outer_lr' (now {config.outer_lr:g})")
        state["x_star"] = problem.solve(th, state["x_star"])  # warm start for Newton (logistic)
        rows["theta"].append(th)
        rows["value"].append(float(problem.outer_loss(state["x_star"])))
        rows["outer"].append(stats["outer_loss"])
        rows["inner"].append(stats["inner_steps"])
        rows["hvps"].append(stats["hvps"])
        state["eval_time"] += time.perf_counter() - start

    with ProgressBar(steps, name, enabled=config.progress) as bar:
        state["start"] = time.perf_counter()
        algo.run(x0, steps, callbacks=[record, bar])
    sink([{"method": name, "update": i, "theta": rows["theta"][i], "validation_loss": rows["value"][i],
           "validation_loss_at_iterate": rows["outer"][i], "inner_steps": rows["inner"][i], "hvps": rows["hvps"][i],
           "wall_s": rows["wall"][i]} for i in range(len(rows["theta"]))])
    return Trace(*(np.array(rows[key]) for key in ("theta", "value", "outer", "inner", "hvps", "wall")))


Config = HyperparameterConfig


def save(result: HyperparameterResult, run_dir) -> list[str]:
    """Write the summary (JSON) and the figure; return the file names."""
    from pathlib import Path

    from ..plotting.bilevel import plot_bilevel
    from ..runtime.rundir import write_summary

    run_dir = Path(run_dir)
    write_summary(run_dir, result.summary())
    curves = {k: (t.inner_steps, t.value, t.theta) for k, t in result.traces.items()}
    plot_bilevel(run_dir / "hyperparameter.png", curves,
                 theta_star=result.theta_star, value_star=result.value_star, target=result.target,
                 title=f"{result.config.problem}: e^θ regularization against validation loss")
    return ["summary.json", "hyperparameter.png"]


def table(result: HyperparameterResult) -> str:
    """The terminal summary: one row per method, then the reference optimum."""
    s = result.summary()
    head = ("method", "final θ", "ℓ(θ_K)", "θ updates", "inner steps", "HVPs", "inner steps to target",
            "HVPs to target", "(by f(x_k))", "wall s to target", "wall s")
    rows = [head]
    for name, m in s["methods"].items():
        reach = "not reached" if m["inner_steps_to_target"] is None else str(m["inner_steps_to_target"])
        hreach = "—" if m["hvps_to_target"] is None else str(m["hvps_to_target"])
        it = m["inner_steps_to_target_iterate"]
        ireach = "not reached" if it is None else str(it)
        wreach = "—" if m["wall_time_to_target_s"] is None else f"{m['wall_time_to_target_s']:.2f}"
        rows.append((name, f"{m['theta_final']:.4f}", f"{m['value_final']:.6f}", str(m["theta_updates"]),
                     str(m["inner_steps"]), str(m["hvps"]), reach, hreach, ireach, wreach, f"{m['wall_time_s']:.2f}"))
    lines = columns(rows) + [
        f"  θ₀ = {s['theta0']:g}, ℓ(θ₀) = {s['value_theta0']:.6f}; inner step η = {s['inner_step_size']:.4g}",
        f"  reference θ* = {s['theta_star']:.4f}, ℓ(θ*) = {s['value_star']:.6f} ({s['reference']})",
        "  ℓ(θ) = f(x*(θ)) with the exact inner solution; 'to target': from then on ℓ(θ_k) ≤ target;",
        "  '(by f(x_k))': the same for the validation loss at the method's own inner iterate",
        f"  target = nested final ℓ + {result.config.reach_tol:g}·(ℓ(θ₀) − nested final ℓ)"
        f" = {s['target']:.6f}",
    ]
    return "\n".join(lines)
