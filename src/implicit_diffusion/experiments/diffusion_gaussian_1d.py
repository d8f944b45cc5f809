"""Experiment ``diffusion-gaussian-1d``: reward training through a finite-horizon diffusion.

The closed-form case of paper-notes §5 (Marion et al. 2024, §4): data N(θ, 1), OU forward
process dX = −X dt + √2 dB on [0, T], exact score s_θ(x, t) = −(x − θe^{−t}), sampled from
N(0, 1) by M Euler–Maruyama steps of the reverse SDE. The sampler is linear in (x₀, θ, noise),
so x_M ~ N(cθ, v) with c and v computed exactly from the steps (c → 1 − e^{−2T} as M → ∞).
Reward R(x) = −(x − θ_target)²: E[R] = −((cθ − θ_target)² + v), optimum θ* = θ_target / c.
θ is trained by the queue algorithm (sequential or pipelined adjoint) or the nested loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..algorithms import DIFFUSION_ALGORITHMS
from ..devices import check_device_name, generator_on, resolve_device
from ..errors import ConfigError
from ..runtime.config import explained_errors
from ..runtime.progress import ProgressBar
from ..runtime.settings import setting
from ..runtime.tables import key_values
from ..runtime.threads import torch_threads
from ..runtime.validation import check_fields, positive, short
from ..samplers.diffusion import euler_maruyama_step
from ..samplers.schedules import VPSchedule

__all__ = ["Config", "GaussianScore", "Result", "run", "save", "table", "linear_law"]

# the exact-gradient algorithms (DRaFT-K's truncated gradient and Adjoint Matching: diffusion-finetune's)
ALGORITHMS = {k: v for k, v in DIFFUSION_ALGORITHMS.items() if k.startswith(("queue", "nested"))}


@explained_errors
@dataclass(frozen=True)
class Config:
    theta0: float = setting(0.0, "θ at the start (the mean shift of the Gaussian score model)")
    theta_target: float = setting(2.0, "the reward's target: R(x) = −(x − theta_target)²")
    T: float = setting(1.0, "horizon of the OU process", allowed="> 0")
    num_sampling_steps: int = setting(20, "M, sampler steps per sample", unit="sampler steps", allowed="> 0")
    batch_size: int = setting(64, "samples per queue slot (per update for the nested loop)",
                                  unit="samples", allowed="> 0")
    num_steps: int = setting(600, "iterations (θ updates once the queue is full)", unit="iterations", allowed="> 0")
    lr: float = setting(0.05, "SGD learning rate on θ", allowed="> 0")
    algorithms: tuple[str, ...] = setting(
        ("queue-pipelined", "queue-sequential", "nested-adjoint"), "the algorithms run one after another from the "
                                                                   "same seed", allowed=ALGORITHMS)
    seed: int = setting(0, "random seed")
    progress: bool = setting(True, "show a progress bar on the terminal")
    device: str = setting("auto", "auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps (float64 throughout)")

    def __post_init__(self) -> None:
        check_fields(self)  # finite numbers, int64 integers, seed bounds (runtime.validation)
        positive(self, "T", "num_sampling_steps", "batch_size", "num_steps", "lr")
        check_device_name(self.device)
        bad = [a for a in self.algorithms if a not in ALGORITHMS]
        if bad or not self.algorithms:
            raise ConfigError(f"config key 'algorithms': unknown {short(bad or 'empty list')}; "
                              f"allowed: {', '.join(ALGORITHMS)}")

    def memory_estimate(self) -> dict[str, int]:
        """Bytes of the dominant allocations, a rough lower bound (:mod:`~implicit_diffusion.runtime.memory`):
        the M + 1 states of the B samples of each of the M queue slots (float64)."""
        return {f"batch_size = {self.batch_size:,} with num_sampling_steps = {self.num_sampling_steps:,} (the "
                f"states of the samples in flight, float64)":
                    8 * self.batch_size * self.num_sampling_steps * (self.num_sampling_steps + 1)}


class GaussianScore(torch.nn.Module):
    """s_θ(x, t) = −(x − θe^{−t}): the exact score of the OU-noised N(θ, 1), x of shape (B, 1)."""

    prediction = "score"

    def __init__(self, theta: float):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(float(theta), dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -(x - self.theta * torch.exp(-t).to(x.dtype)[:, None])


def linear_law(schedule: VPSchedule) -> tuple[float, float]:
    """(c, v) with x_M ~ N(cθ, v) for x₀ ~ N(0, 1): each step is x ↦ a_m x + b_m θ + s_m z,
    read off the step itself with unit inputs, then propagated exactly."""
    c, v = 0.0, 1.0
    for m in range(schedule.num_steps):
        a, b, s = (_scalar_step(schedule, m, *unit) for unit in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
        c, v = a * c + b, a * a * v + s * s
    return c, v


def _scalar_step(schedule: VPSchedule, m: int, x: float, theta: float, z: float) -> float:
    def one(value: float) -> torch.Tensor:
        return torch.tensor([[value]], dtype=torch.float64)

    with torch.no_grad():
        return float(euler_maruyama_step(one(x), GaussianScore(theta), m, schedule=schedule, noise=one(z)))


@dataclass
class Result:
    config: Config
    thetas: dict[str, np.ndarray]  # algorithm → θ after each iteration
    rewards: dict[str, np.ndarray]  # algorithm → exiting batch's mean reward (NaN while filling)
    wall_times: dict[str, float]
    theta_star: float
    gain: float  # c
    variance: float  # v

    def summary(self) -> dict:
        tail = max(1, len(next(iter(self.thetas.values()))) // 5)
        return {
            "theta_star": self.theta_star,
            "gain_c": self.gain,
            **{f"theta_final_mean_last20%/{k}": float(v[-tail:].mean()) for k, v in self.thetas.items()},
            **{f"wall_time_s/{k}": t for k, t in self.wall_times.items()},
        }


def run(config: Config, *, metrics_sink=None) -> Result:
    """Train θ with each algorithm of ``config.algorithms`` from the same seed."""
    with torch_threads(None, config.batch_size * config.num_sampling_steps):
        return _run(config, metrics_sink)


def _run(config: Config, metrics_sink) -> Result:
    sink = metrics_sink or (lambda records: None)
    schedule = VPSchedule("ou", num_steps=config.num_sampling_steps, T=config.T, t_min=0.0)
    gain, variance = linear_law(schedule)
    thetas, rewards, walls = {}, {}, {}
    target, device = config.theta_target, resolve_device(config.device)

    def reward_fn(x: torch.Tensor) -> torch.Tensor:
        return -((x[:, 0] - target) ** 2)

    for name in config.algorithms:
        cls, options = ALGORITHMS[name]
        generator = generator_on(device, config.seed)
        model = GaussianScore(config.theta0).to(device)
        algo = cls(model, euler_maruyama_step, schedule, torch.optim.SGD(model.parameters(), lr=config.lr),
                   init_fn=lambda g: torch.randn(config.batch_size, 1, generator=g, dtype=torch.float64,
                                                 device=device),
                   reward_fn=reward_fn, **options)
        th = np.empty(config.num_steps)
        rw = np.full(config.num_steps, np.nan)

        def record(k, _x, stats, th=th, rw=rw, model=model):
            th[k] = model.theta.item()
            if "reward" in stats:
                rw[k] = float(stats["reward"])

        start = time.perf_counter()
        with ProgressBar(config.num_steps, name, enabled=config.progress) as bar:
            algo.run(config.num_steps, generator=generator, callbacks=[record, bar])
        walls[name] = time.perf_counter() - start
        thetas[name], rewards[name] = th, rw
        sink([{"algorithm": name, "step": k, "theta": float(th[k]),
               "reward": None if np.isnan(rw[k]) else float(rw[k])} for k in range(config.num_steps)])
    return Result(config, thetas, rewards, walls, target / gain, gain, variance)


def save(result: Result, run_dir) -> list[str]:
    """Write theta.png and, last, summary.json; return the file names."""
    from pathlib import Path

    from ..plotting.diffusion import plot_theta_trajectories
    from ..runtime.rundir import write_summary

    run_dir = Path(run_dir)
    plot_theta_trajectories(run_dir / "theta.png", result.thetas, result.theta_star,
                            ylabel="θ_k", title="θ_k against the exact optimum θ* = θ_target / c")
    write_summary(run_dir, result.summary())  # after the figures: it marks the run complete
    return ["theta.png", "summary.json"]


def table(result: Result) -> str:
    """The terminal summary: θ's last-20% mean per algorithm against the exact optimum."""
    tail = max(1, result.config.num_steps // 5)
    rows = [("exact optimum θ* = θ_target / c", f"{result.theta_star:.4f}  (c = {result.gain:.4f})")]
    for name, th in result.thetas.items():
        rows.append((f"{name}: mean θ over the last 20%", f"{th[-tail:].mean():.4f}  "
                     f"(|Δ| = {abs(th[-tail:].mean() - result.theta_star):.4f}, {result.wall_times[name]:.2f} s)"))
    return key_values(rows)
