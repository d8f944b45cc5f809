"""Experiment ``langevin-mixture``: reward training of a Langevin process (Marion et al. 2024, §5.1).

Target π*(θ) ∝ exp(−V(x, θ)), V(x, θ) = −log Σₖ softmax(θ)ₖ N(x; cₖ, I), six centres on a
hexagon of radius 4, θ₀ = (1.5, 0, 1.5, 0, 1.5, 0). Objective F(p) = −λE_p[R] + βKL(p‖π*(θ₀))
with the non-differentiable reward R(x) = 1[x₁ ≥ 0] e^{−‖x − (4, 3.8)‖²/20}/2.5. Implicit
Diffusion (Algorithm 2): 1,000 particles from N(0, I), 5,000 iterations of one ULA step
(γ = 0.2) and one SGD step on θ (η = 0.1). Comparisons (``compare = true``): the nested loop
with T ∈ {10, 100} inner steps at the same number of sampler steps, and Langevin on
V(·, θ₀) − λ_s R_s (smoothed reward added to the energy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch

from ..algorithms import NestedLoop, SingleLoop, make_lr_scheduler, make_optimizer
from ..algorithms.base import run_steps
from ..devices import check_device_name, generator_on, resolve_device
from ..distributed import all_gather_rows, is_main, world_size
from ..errors import ConfigError
from ..models import (
    HEXAGON_THETA0,
    GaussianMixture,
    Potential,
    TiltedPotential,
    hexagon_mixture,
)
from ..objectives import KLToReference, RewardEstimator, hexagon_reward, hexagon_reward_smooth
from ..objectives.hexagon_exact import ExactEvaluation
from ..runtime.checkpoints import Checkpoints, NoCheckpoints, check_checkpoint_every
from ..runtime.config import explained_errors
from ..runtime.guards import DivergenceGuard
from ..runtime.progress import ProgressBar
from ..runtime.recording import EvalRecorder, OrderedSink, RewardRecorder, RunningMean
from ..runtime.settings import setting
from ..runtime.state import state_of
from ..runtime.tables import key_values
from ..runtime.threads import torch_threads
from ..runtime.validation import check, check_fields, nonnegative, positive
from ..samplers import ula_step
from ..samplers.blocks import ParticleBlocks
from ..samplers.registry import SamplerSetup, sampler_setup

__all__ = ["LangevinMixtureConfig", "LangevinMixtureResult", "run"]

REWARDS = {"indicator": hexagon_reward, "smooth": hexagon_reward_smooth}
SUPPORTS_SHARDING = True  # torchrun: particles / queue slots split over processes


@explained_errors
@dataclass(frozen=True)
class LangevinMixtureConfig:
    """Settings of the §5.1 experiment; defaults are the paper's."""

    num_particles: int = setting(1000, "N, the particles of the single loop", allowed="> 0")
    num_steps: int = setting(5000, "K, θ updates (single loop: K·S sampler steps)", unit="θ updates", allowed="> 0")
    step_size: float = setting(0.2, "γ of ULA (the sampler's step)", allowed="> 0 (myula-box: at most 1)")
    lr: float = setting(0.1, "η, the θ learning rate", allowed="> 0")
    lr_schedule: Literal["constant", "inverse-sqrt"] = setting("constant", "the learning rate over updates: "
                                                                           "constant, or η/√(k+1)")
    optimizer: Literal["sgd", "adam"] = setting("sgd", "the θ optimizer")
    sampler_steps_per_update: int = setting(1, "S, sampler steps per θ update", unit="sampler steps", allowed="> 0")
    sampler: Literal["ula", "mala", "preconditioned", "myula-box", "primal-dual-box", "mirror-orthant"] = setting(
        "ula", "the Langevin sampler: ula, mala (Metropolis-adjusted), preconditioned, myula-box (proximal), "
               "primal-dual-box or mirror-orthant")
    theta0: tuple[float, ...] = setting(HEXAGON_THETA0, "θ at the start: the six logits of the hexagon mixture's "
                                                        "weights", allowed="6 numbers")
    reward: Literal["indicator", "smooth"] = setting("indicator", "the reward: the indicator of a region, or its "
                                                                  "smooth version")
    reward_weight: float = setting(1.0, "λ")
    kl_weight: float = setting(0.0, "β in βKL(p‖π*(θ₀))", allowed=">= 0")
    eval_every: int = setting(100, "θ updates between exact evaluations of E[R], the KL and the weights",
                                   unit="θ updates", allowed="> 0")
    snapshot_steps: tuple[int, ...] = setting((0, 100, 1000, 5000), "θ updates at which the particle clouds are "
                                                                    "saved (clipped to num_steps)",
                                                                    allowed="integers >= 0")
    compare: bool = setting(False, "also run the nested loops and the tilted potential")
    nested_inner_steps: tuple[int, ...] = setting((10, 100), "with compare: the inner sampler steps of each "
                                                             "nested-loop baseline", allowed="integers >= 1")
    tilt_weight: float = setting(1.0, "λ_s in the tilted potential V − λ_s R_s (with compare)")
    seed: int = setting(0, "random seed")
    dtype: Literal["float32", "float64"] = setting("float32", "floating-point type of the particles and θ")
    device: str = setting("auto", "where the run computes: auto (CUDA when available, else CPU), cpu, cuda, cuda:N "
                                  "or mps")
    num_threads: int | None = setting(None, "CPU threads of torch; None (the default) = automatic: 1 thread below "
                                            "20,000 numbers per batch, torch's default above",
                                      allowed="None or an integer from 1 to this machine's CPU count")
    progress: bool = setting(True, "show a progress bar on the terminal")
    checkpoint_every: int | None = setting(None, "θ updates between checkpoints; None (the default) = only on "
                                                 "Ctrl-C, SIGTERM or SIGHUP", unit="θ updates",
                                           allowed="None or an integer >= 1")
    particle_blocks: int = setting(1, "B blocks of particles with their own random streams; torchrun needs a "
                                      "multiple of its world size W", allowed=">= 1, dividing num_particles")
    on_nonfinite: Literal["stop", "skip"] = setting("stop", "stop the run at a non-finite particle or θ, or skip "
                                                            "(reject) such particle moves and θ updates")

    def __post_init__(self) -> None:
        check_fields(self)  # finite numbers, int64 integers, seed and num_threads bounds (runtime.validation)
        positive(self, "num_particles", "num_steps", "step_size", "lr", "sampler_steps_per_update", "eval_every")
        if len(self.theta0) != 6:
            raise ConfigError(f"config key 'theta0' must have 6 entries (one per hexagon component), "
                              f"got {len(self.theta0)}")
        check(self, "nested_inner_steps", lambda ts: all(t >= 1 for t in ts), "integers >= 1", verb="hold")
        check(self, "snapshot_steps", lambda ss: all(s >= 0 for s in ss), "integers >= 0", verb="hold")
        if self.particle_blocks < 1 or self.num_particles % self.particle_blocks:
            raise ConfigError(f"config key 'particle_blocks' must be >= 1 and divide num_particles "
                              f"({self.num_particles}), got {self.particle_blocks}")
        check_checkpoint_every(self.checkpoint_every)
        check_device_name(self.device)
        nonnegative(self, "kl_weight")
        if self.sampler == "myula-box" and self.step_size > 1.0:
            raise ConfigError(f"config key 'step_size' must be <= 1 (the MYULA parameter λ) with sampler "
                              f"'myula-box', got {self.step_size}")

    def memory_estimate(self) -> dict[str, int]:
        """Bytes of the dominant allocations, a rough lower bound (:mod:`~implicit_diffusion.runtime.memory`):
        per particle its 2 coordinates in x, ∇V, the noise and the next step, and its 6 × 2 differences
        to the mixture's centres; the particle clouds kept at ``snapshot_steps``."""
        b, n = (4 if self.dtype == "float32" else 8), self.num_particles
        return {f"num_particles = {n:,} (particles of dimension 2 in {self.dtype}: x, ∇V, noise, the next step "
                f"and the differences to the 6 centres)": n * (4 * 2 + 6 * 2) * b,
                f"snapshot_steps ({len(self.snapshot_steps)} clouds of {n:,} particles)":
                    len(self.snapshot_steps) * n * 2 * b}


@dataclass
class Curve:
    """A metric against the number of sampler steps."""

    sampler_steps: np.ndarray
    values: np.ndarray


@dataclass
class LangevinMixtureResult:
    config: LangevinMixtureConfig
    rewards: np.ndarray  # particles' mean reward at every θ update, (num_steps,)
    eval_steps: np.ndarray  # θ-update indices of the exact evaluations
    exact_rewards: np.ndarray  # E_{π*(θ_k)}[R]
    kls: np.ndarray  # KL(π*(θ_k)‖π*(θ₀))
    weights: np.ndarray  # softmax(θ_k), (num_evals, 6)
    theta: np.ndarray  # final θ
    snapshots: dict[int, np.ndarray]  # θ-update index → particles (N, 2)
    snapshot_weights: dict[int, np.ndarray]
    wall_time: float  # seconds in the single loop
    reward_initial_exact: float  # E_{π*(θ₀)}[R]
    reward_optimum: float  # max over components of E_{N(cₖ, I)}[R]
    comparisons: dict[str, Curve] = field(default_factory=dict)
    acceptance_rate: float | None = None  # mean over the run (Metropolis-adjusted samplers)

    def summary(self) -> dict[str, float | list[float] | str | None]:
        tail = max(1, min(500, len(self.rewards)))
        return {
            "sampler": self.config.sampler,
            "acceptance_rate": self.acceptance_rate,
            "reward_initial": float(self.rewards[0]),
            "reward_final_mean_last": float(self.rewards[-tail:].mean()),
            "exact_reward_initial": self.reward_initial_exact,
            "exact_reward_final": float(self.exact_rewards[-1]),
            "reward_optimum": self.reward_optimum,
            "kl_final": float(self.kls[-1]),
            "weights_final": [float(w) for w in self.weights[-1]],
            "wall_time_s": self.wall_time,
        }


def _initial_particles(n: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """p₀ = N(0, I), shape ``(n, 2)``, on the generator's device."""
    return torch.randn(n, 2, generator=generator, dtype=dtype, device=generator.device)


class _Problem(NamedTuple):
    """The potential θ lives in, and what the algorithm sees: the same target in the sampler's
    coordinates (translated by ``setup.shift`` for mirror Langevin on the orthant)."""

    potential: GaussianMixture
    algo_potential: Potential
    reward_fn: Callable[[torch.Tensor], torch.Tensor]  # R on the sampler's coordinates
    setup: SamplerSetup


def _problem(config: LangevinMixtureConfig, dtype: torch.dtype, device: torch.device) -> _Problem:
    potential = hexagon_mixture(config.theta0, dtype=dtype).to(device)
    reference = hexagon_mixture(config.theta0, dtype=torch.float64)  # the preconditioner's V(·, θ₀)
    setup = sampler_setup(config.sampler, config.step_size, reference=reference, reference_points=reference.means)
    algo_potential, reward_fn = setup.translate(potential, REWARDS[config.reward], dtype)
    return _Problem(potential, algo_potential.to(device), reward_fn, setup)


def run(
    config: LangevinMixtureConfig,
    *,
    metrics_sink: Callable[[list[dict]], None] | None = None,
    checkpoints: Checkpoints | None = None,
) -> LangevinMixtureResult:
    """Run the experiment; ``metrics_sink`` receives blocks of JSON-ready records as they come.

    With ``checkpoints`` (see :mod:`~implicit_diffusion.runtime.checkpoints`), the single loop writes a checkpoint every
    ``config.checkpoint_every`` updates and on Ctrl-C, or continues from a saved one.
    """
    with torch_threads(config.num_threads, 2 * config.num_particles):
        return _run(config, metrics_sink, checkpoints)


def _run(config: LangevinMixtureConfig, metrics_sink, checkpoints: Checkpoints | None) -> LangevinMixtureResult:
    checkpoints = checkpoints or NoCheckpoints()
    dtype, device = getattr(torch, config.dtype), resolve_device(config.device)
    _check_sharding(config)
    blocks = ParticleBlocks(config.seed, config.particle_blocks, config.num_particles, device)
    problem = _problem(config, dtype, device)
    potential, setup = problem.potential, problem.setup
    exact = ExactEvaluation(potential.means.double().cpu().numpy(), 1.0, config.reward, config.theta0)

    estimator = RewardEstimator(problem.reward_fn, config.reward_weight)
    if config.kl_weight > 0:
        estimator = estimator + KLToReference(problem.algo_potential, config.kl_weight)
    # foreach=False: θ is one small tensor, and the single-tensor path has less overhead
    optimizer = make_optimizer(config.optimizer, potential.parameters(), config.lr, foreach=False)
    lr_scheduler = make_lr_scheduler(optimizer, config.lr_schedule)
    algo = SingleLoop(
        problem.algo_potential,
        estimator,
        optimizer,
        step_size=setup.step_size,
        sampler=blocks.step(setup.step),
        sampler_steps_per_update=config.sampler_steps_per_update,
        lr_scheduler=lr_scheduler,
        nonfinite="skip" if config.on_nonfinite == "skip" else "update",
    )

    # one ordering point: the per-step rewards (handed over in blocks) go out before any later record
    sink = OrderedSink(metrics_sink or (lambda records: None))
    num_steps = config.num_steps
    snapshot_steps = sorted({min(s, num_steps) for s in config.snapshot_steps} | {num_steps})
    rewards = RewardRecorder(num_steps, sink, dtype=dtype)
    shift = setup.shift

    def snapshot(done: int, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Every process's particles, and the weights softmax(θ)."""
        w = torch.softmax(potential.logits.detach().double().cpu(), 0).numpy()
        return all_gather_rows(y.detach()).double().cpu().numpy().copy(), w

    # exact E_{π*(θ)}[R], KL(π*(θ)‖π*(θ₀)) and weights every eval_every updates
    evals = EvalRecorder(lambda done, y: exact(potential.logits), config.eval_every, num_steps, sink,
                         snapshot=snapshot, snapshot_steps=snapshot_steps)
    acceptance = RunningMean("acceptance_rate")
    first = checkpoints.start
    bar = ProgressBar(num_steps, f"single loop ({config.sampler})", enabled=config.progress and is_main(),
                      initial=first)
    guard = DivergenceGuard(potential.parameters(), f"a smaller step_size (now {config.step_size:g}) or lr "
                                                     f"(now {config.lr:g})")
    # the guard first: nothing non-finite is recorded, evaluated or checkpointed
    # evaluations see the target's coordinates (the sampler's are translated by ``shift``)
    callbacks = [guard, rewards, (lambda k, y, st: evals(k, y - shift, st)) if shift else evals, acceptance, bar]
    # everything the loop needs to continue bit for bit, but the particles and the primal-dual dual iterate
    parts = {"potential": potential, "optimizer": optimizer, "lr_scheduler": lr_scheduler, "rewards": rewards,
             "evals": evals, "acceptance": acceptance, **blocks.named_generators()}

    def state(done: int, x: torch.Tensor) -> tuple[dict, dict]:
        tensors, meta = state_of(parts)
        dual = getattr(setup.step, "dual", None)  # primal-dual Langevin's dual iterate
        return {**tensors, "particles": x, **({"sampler.dual": dual} if dual is not None else {})}, meta

    x = blocks.initial(lambda n, g: _initial_particles(n, g, dtype))
    if checkpoints.resumed:
        tensors, _ = checkpoints.state
        # the particles as the run has them; the dual iterate is there for primal-dual Langevin only
        checkpoints.restore(parts, num_steps=num_steps, like={"particles": x, "sampler.dual": None})
        x = tensors["particles"].to(device, dtype)
        # the evaluations so far must look like those this run makes (they end up in the figures and summary)
        measured, taken, n = exact(potential.logits), snapshot(0, x), len(evals.steps)
        checkpoints.check_like("meta 'evals.steps'", evals.steps, [0] * n)
        checkpoints.check_like("the evaluations", evals.values, {k: [v] * n for k, v in measured.items()} if n else {})
        for step, snap in evals.snapshots.items():
            checkpoints.check_like(f"the snapshot at step {step!r}", snap, taken)
        if "sampler.dual" in tensors:
            setup.step.dual = tensors["sampler.dual"].to(device)
    else:
        evals.record(0, x)
        x = x + shift
    callbacks.append(checkpoints.callback(state))  # last: it saves what the others recorded
    start = time.perf_counter()
    try:
        with checkpoints.catch_interrupts(), bar:
            x = algo.run(x, num_steps - first, generator=blocks.generator, start=first, callbacks=callbacks)
    finally:  # an interrupted run still leaves every recorded step in the metrics
        rewards.flush()
    wall = time.perf_counter() - start

    result = LangevinMixtureResult(
        config=config,
        rewards=rewards.values(),
        eval_steps=np.array(evals.steps),
        exact_rewards=evals.column("exact_reward"),
        kls=evals.column("kl"),
        weights=evals.column("weights"),
        theta=potential.logits.detach().double().cpu().numpy().copy(),
        snapshots={step: particles for step, (particles, _) in evals.snapshots.items()},
        snapshot_weights={step: w for step, (_, w) in evals.snapshots.items()},
        wall_time=wall,
        reward_initial_exact=exact.reward_initial,
        reward_optimum=exact.reward_optimum,
        acceptance_rate=acceptance.mean(),
    )
    if config.compare:
        result.comparisons = _comparisons(config, dtype, device, REWARDS[config.reward])
    return result


def _check_sharding(config: LangevinMixtureConfig) -> None:
    """Under torchrun each of the W processes holds particle_blocks/W blocks of particles."""
    world = world_size()
    if config.particle_blocks % world:
        raise ConfigError(f"with {world} processes, config key 'particle_blocks' must be a multiple of {world} "
                          f"(each process holds particle_blocks/{world} blocks), got {config.particle_blocks}")
    if world > 1 and config.compare:
        raise ConfigError("config key 'compare' runs the baselines in a single process; run it without torchrun")
    share = config.particle_blocks // world
    if share > 1 and config.sampler == "primal-dual-box":
        raise ConfigError("sampler 'primal-dual-box' keeps one dual iterate per particle batch: config key "
                          f"'particle_blocks' must equal the number of processes ({world}), "
                          f"got {config.particle_blocks}")


def _comparisons(config: LangevinMixtureConfig, dtype: torch.dtype, device: torch.device,
                 reward_fn) -> dict[str, Curve]:
    """Nested loops and the tilted potential at the single loop's number of sampler steps."""
    budget = config.num_steps * config.sampler_steps_per_update
    out: dict[str, Curve] = {}
    for t in config.nested_inner_steps:
        generator = generator_on(device, config.seed)
        problem = _problem(config, dtype, device)
        optimizer = make_optimizer(config.optimizer, problem.potential.parameters(), config.lr, foreach=False)
        shift = problem.setup.shift
        algo = NestedLoop(
            problem.algo_potential,
            RewardEstimator(problem.reward_fn, config.reward_weight),
            optimizer,
            init_fn=lambda g: _initial_particles(config.num_particles, g, dtype) + shift,
            num_inner_steps=t,
            step_size=problem.setup.step_size,
            sampler=problem.setup.step,
            lr_scheduler=make_lr_scheduler(optimizer, config.lr_schedule),
        )
        updates = max(1, budget // t)
        rec = RewardRecorder(updates, lambda r: None, dtype=dtype)
        with ProgressBar(updates, f"nested T={t}", enabled=config.progress) as bar:
            algo.run(None, updates, generator=generator, callbacks=[rec, bar])
        out[f"nested T={t}"] = Curve(np.arange(1, updates + 1) * t, rec.values())

    generator = generator_on(device, config.seed)
    tilted = TiltedPotential(hexagon_mixture(config.theta0, dtype=dtype), hexagon_reward_smooth,
                             config.tilt_weight).to(device)

    def tilted_step(x: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
        x, _ = ula_step(x, tilted, step_size=config.step_size, generator=generator)
        return x, {"reward": reward_fn(x).mean()}

    rec = RewardRecorder(budget, lambda r: None, dtype=dtype)
    with ProgressBar(budget, f"V − {config.tilt_weight:g}·R_s", enabled=config.progress) as bar, torch.no_grad():
        run_steps(tilted_step, _initial_particles(config.num_particles, generator, dtype), budget,
                  callbacks=[rec, bar])
    out[f"V − {config.tilt_weight:g}·R_s"] = Curve(np.arange(1, budget + 1), rec.values())
    return out


Config = LangevinMixtureConfig


def save(result: LangevinMixtureResult, run_dir) -> list[str]:
    """Write the final θ (safetensors), a summary (JSON) and the figures; return the file names."""
    import json
    from pathlib import Path

    from ..objectives.rewards import REWARD_CENTRE
    from ..plotting import langevin as plotting
    from ..runtime.rundir import write_summary
    from ..serialization import save_tensors

    run_dir = Path(run_dir)
    cfg = result.config
    save_tensors(run_dir / "theta.safetensors", {"theta": torch.from_numpy(result.theta)},
                 {"weights": json.dumps(result.weights[-1].tolist())})
    means = hexagon_mixture(cfg.theta0, dtype=torch.float64).means.numpy()
    s = cfg.sampler_steps_per_update  # x axes in sampler steps
    plotting.plot_particle_clouds(run_dir / "particles.png", result.snapshots, result.snapshot_weights, means,
                                  reward_centre=REWARD_CENTRE, steps_per_update=s)
    curves = {"Implicit Diffusion (single loop)": (np.arange(1, len(result.rewards) + 1) * s, result.rewards),
              **{k: (c.sampler_steps, c.values) for k, c in result.comparisons.items()}}
    evals = np.maximum(result.eval_steps, 1) * s
    plotting.plot_reward_curves(run_dir / "reward.png", curves, exact=(evals, result.exact_rewards),
                                kl=(evals, result.kls), hlines={"optimum (all mass on c₂)": result.reward_optimum,
                                                                "E_π*(θ₀)[R]": result.reward_initial_exact})
    plotting.plot_mixture_weights(run_dir / "weights.png", result.eval_steps, result.weights,
                                  plotting.component_labels(len(means)), steps_per_update=s)
    return ["theta.safetensors", "particles.png", "reward.png", "weights.png", write_summary(run_dir, result.summary())]


def table(result: LangevinMixtureResult) -> str:
    """The terminal summary."""
    s = result.summary()
    rows = [
        ("mean reward, first step (particles)", f"{s['reward_initial']:.4f}"),
        (f"mean reward, last {min(500, len(result.rewards))} steps (particles)", f"{s['reward_final_mean_last']:.4f}"),
        ("E[R] under π*(θ₀) → π*(θ_K) (exact)", f"{s['exact_reward_initial']:.4f} → {s['exact_reward_final']:.4f}"),
        ("best achievable E[R] (all mass on c₂)", f"{s['reward_optimum']:.4f}"),
        ("KL(π*(θ_K) ‖ π*(θ₀))", f"{s['kl_final']:.3f}"),
        ("final weights c1..c6", " ".join(f"{w:.3f}" for w in s["weights_final"])),
        ("wall time, single loop", f"{s['wall_time_s']:.2f} s ({s['sampler']})"),
    ]
    if s["acceptance_rate"] is not None:
        rows.append(("mean acceptance rate", f"{s['acceptance_rate']:.3f}"))
    for name, curve in result.comparisons.items():
        tail = max(1, len(curve.values) // 10)
        rows.append((f"{name}: mean reward, last 10% of steps", f"{curve.values[-tail:].mean():.4f}"))
    return key_values(rows)
