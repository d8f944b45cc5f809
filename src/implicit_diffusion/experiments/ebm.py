"""Experiment ``ebm``: energy-based model training with Γ_ref (Marion et al. 2024, §3, F(p) = KL(p_data ‖ p)).

An energy MLP V(x, θ) defines π*(θ) ∝ exp(−V(x, θ)); θ minimises KL(p_data ‖ π*(θ)) (maximum
likelihood), whose gradient is Γ_ref(π*(θ), θ) = E_data[∇θV] − E_{π*(θ)}[∇θV]
(:class:`~implicit_diffusion.objectives.MinibatchContrastiveKL`, with a data minibatch per update
and the energy penalty α(E_data[V²] + E_p[V²]) applied identically to both methods). Adam on θ.

- **single loop** (Implicit Diffusion, Algorithm 2): persistent particles; S ULA steps per θ update;
  K updates, so K·S sampler steps.
- **nested loop** (Algorithm 1, short-run chains): particles restarted from p₀ = N(0, σ₀²I) at every
  update, T ULA steps each; K·S/T updates, so the same number of sampler steps × particles.

Metrics every ``eval_every`` sampler steps: MMD² (RBF kernel, unbiased) between each method's own
current particles and held-out data, and the mean energy of held-out data minus that of the
particles. At the end: MMD² between fresh samples of each learned energy (``fresh_steps`` ULA steps
from p₀, the same generator seed for both) and held-out data; for reference, MMD² between a
training subsample and held-out data (the floor set by the sample size).

Checkpoints (``--checkpoint-every N`` θ updates, and Ctrl-C) record the method in progress with its
state (θ, Adam, particles, the minibatch and sampler generators, the curves so far) and the finished
method's results; ``implicit-diffusion resume RUN_DIR`` continues bit for bit. Non-finite particles or
θ stop the run at once (:class:`~implicit_diffusion.errors.DivergenceError`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..algorithms import NestedLoop, SingleLoop
from ..data.builtin import train_heldout
from ..devices import check_device_name, generator_on, resolve_device
from ..errors import ConfigError, DataError
from ..metrics import mmd2
from ..models import EnergyMLP
from ..models.potentials import grid_density
from ..objectives import MinibatchContrastiveKL
from ..runtime.checkpoints import Checkpoints, NoCheckpoints, check_checkpoint_every
from ..runtime.config import explained_errors
from ..runtime.guards import DivergenceGuard
from ..runtime.progress import ProgressBar
from ..runtime.recording import EvalRecorder
from ..runtime.settings import setting
from ..runtime.state import pack, state_of
from ..runtime.threads import torch_threads
from ..runtime.validation import check, check_fields, positive
from ..samplers import langevin_chain

__all__ = ["EBMConfig", "EBMResult", "MethodResult", "run", "save", "table", "Config"]

DATASETS = ("moons", "swiss-roll", "rings", "digits")
# per data set: (ULA step size γ, initial std σ₀, MMD bandwidths, energy penalty α)
_DEFAULTS = {
    "moons": (0.01, 2.0, (0.1, 0.3, 1.0), 0.1),
    "swiss-roll": (0.01, 2.0, (0.1, 0.3, 1.0), 0.1),
    "rings": (0.01, 2.0, (0.1, 0.3, 1.0), 0.1),
    # α = 0.1 held the 64-dim energies too flat to confine the particles (MMD² stayed at its start)
    "digits": (0.01, 0.5, (1.0, 2.0, 4.0), 0.01),
}


@explained_errors
@dataclass(frozen=True)
class EBMConfig:
    """Settings of the EBM experiment; entries set to None (or ``()``) take the data set's default (``_DEFAULTS``)."""

    data: Literal["moons", "swiss-roll", "rings", "digits"] = setting("moons", "the built-in data set: 2-D points or "
                                                                               "the 8×8 digits")
    num_train: int = setting(4000, "training points, 2-D data only (digits: all but the held-out images)",
                                   unit="points", allowed="> 0")
    num_heldout: int | None = setting(None, "held-out points of the MMD² evaluations; None (the default): 1,000 "
                                            "(2-D) or 300 (digits)",
                                            unit="points", allowed=">= 2 (digits: at most 797)")
    num_particles: int = setting(1000, "N, the particles of each method", allowed=">= 2")
    batch_size: int = setting(1000, "data minibatch per θ update", unit="points", allowed="> 0")
    num_steps: int = setting(3000, "K, θ updates of the single loop", unit="θ updates", allowed="> 0")
    sampler_steps_per_update: int = setting(1, "S, ULA steps per single-loop θ update",
                                               unit="sampler steps", allowed="> 0")
    nested_inner_steps: int = setting(20, "T, ULA steps per nested-loop θ update (nested updates = K·S // T)",
                                          unit="sampler steps",
                                          allowed="> 0, at most num_steps·sampler_steps_per_update")
    nested_budget_factor: int = setting(1, "the nested loop's sampler budget is this × the single loop's (1: equal)",
                                           allowed="> 0")
    step_size: float | None = setting(None, "γ of ULA; None (the default): the data set's own (0.01)", allowed="> 0")
    init_std: float | None = setting(None, "σ₀ of p₀ = N(0, σ₀²I); None (the default): the data set's own (2 for 2-D "
                                           "data, 0.5 for digits)", allowed="> 0")
    lr: float = setting(1e-3, "Adam's learning rate", allowed="> 0")
    hidden: int = setting(128, "width of the energy MLP's hidden layers", allowed="> 0")
    depth: int = setting(2, "hidden layers of the energy MLP", allowed="> 0")
    energy_penalty: float | None = setting(None, "α in the penalty α(E_data[V²] + E_p[V²]); None (the default): the "
                                                 "data set's own (0.1 for 2-D data, 0.01 for digits)", allowed=">= 0")
    eval_every: int = setting(100, "sampler steps between evaluations", unit="sampler steps", allowed="> 0")
    fresh_steps: int = setting(1000, "ULA steps of the final fresh-sample chains", unit="sampler steps", allowed="> 0")
    mmd_bandwidths: tuple[float, ...] = setting((), "bandwidths of MMD²'s RBF kernels; () (the default): the data "
                                                    "set's own ((0.1, 0.3, 1) for 2-D data, (1, 2, 4) for digits)",
                                                    allowed="numbers > 0")
    compare: bool = setting(True, "also train the nested-loop baseline")
    seed: int = setting(0, "random seed")
    dtype: Literal["float32", "float64"] = setting("float32", "floating-point type of the particles and the energy")
    device: str = setting("auto", "where the run computes: auto (CUDA when available, else CPU), cpu, cuda, cuda:N "
                                  "or mps")
    num_threads: int | None = setting(None, "CPU threads of torch; None (the default) = automatic: 1 thread for "
                                            "small batches, torch's default above (runtime.threads)",
                                      allowed="None or an integer from 1 to this machine's CPU count")
    progress: bool = setting(True, "show a progress bar on the terminal")
    checkpoint_every: int | None = setting(None, "θ updates between checkpoints, in each method's loop; None (the "
                                                 "default) = only on Ctrl-C, SIGTERM or SIGHUP", unit="θ updates",
                                           allowed="None or an integer >= 1")

    def __post_init__(self) -> None:
        check_fields(self)  # finite numbers, int64 integers, seed and num_threads bounds (runtime.validation)
        if self.data not in DATASETS:
            raise ConfigError(f"config key 'data' must be one of {', '.join(DATASETS)}, got {self.data!r}")
        positive(self, "num_train", "num_particles", "batch_size", "num_steps", "sampler_steps_per_update",
                 "nested_inner_steps", "nested_budget_factor", "lr", "hidden", "depth", "eval_every", "fresh_steps")
        check(self, ("step_size", "init_std"), lambda v: v is None or v > 0,
              "> 0, or None (omit the key) for the data set's default")
        check(self, "energy_penalty", lambda v: v is None or v >= 0,
              ">= 0, or None (omit the key) for the data set's default")
        check(self, "mmd_bandwidths", lambda bw: all(h > 0 for h in bw), "numbers > 0", verb="hold")
        if (self.num_heldout is not None and self.num_heldout < 2) or self.num_particles < 2:
            raise ConfigError("config keys 'num_heldout' and 'num_particles' must be >= 2 "
                              "(the unbiased MMD² needs pairs; omit num_heldout for the data set's default)")
        if self.data == "digits" and self.heldout_size > 797:
            raise ConfigError(f"config key 'num_heldout' must be <= 797 for digits (1,797 images), "
                              f"got {self.num_heldout}")
        if self.compare and self.num_steps * self.sampler_steps_per_update < self.nested_inner_steps:
            raise ConfigError(
                f"config key 'nested_inner_steps' ({self.nested_inner_steps}) exceeds the sampler budget "
                f"num_steps·sampler_steps_per_update = {self.num_steps * self.sampler_steps_per_update}"
            )
        check_checkpoint_every(self.checkpoint_every)
        check_device_name(self.device)

    @property
    def heldout_size(self) -> int:
        """``num_heldout`` with the data set's default filled in."""
        if self.num_heldout is not None:
            return self.num_heldout
        return 300 if self.data == "digits" else 1000

    def resolved(self) -> tuple[float, float, tuple[float, ...], float]:
        """(γ, σ₀, bandwidths, α) with the data set's defaults filled in."""
        gamma, std, bw, alpha = _DEFAULTS[self.data]
        return (gamma if self.step_size is None else self.step_size, std if self.init_std is None else self.init_std,
                self.mmd_bandwidths or bw, alpha if self.energy_penalty is None else self.energy_penalty)

    def memory_estimate(self) -> dict[str, int]:
        """Bytes of the dominant allocations, a rough lower bound (:mod:`~implicit_diffusion.runtime.memory`):
        the particles (x, ∇V, noise, next step) and the energy MLP's activations on them, kept for ∇ₓV;
        the data minibatch's activations; the Gram matrices of MMD² between particles and held-out data
        (n², m², n·m entries, with their exponentials); the training points."""
        b = 4 if self.dtype == "float32" else 8
        dim = 64 if self.data == "digits" else 2
        n, m, width = self.num_particles, self.heldout_size, self.hidden * self.depth
        return {f"num_particles = {n:,} (particles of dimension {dim} in {self.dtype}, with the energy's "
                f"{width} activations each)": n * (4 * dim + 2 * width) * b,
                f"batch_size = {self.batch_size:,} (the data minibatch's {width} activations each)":
                    self.batch_size * (dim + 2 * width) * b,
                f"num_particles = {n:,} with num_heldout = {m:,} (the Gram matrices of MMD², "
                f"{n * n + m * m + n * m:,} entries)": 2 * (n * n + m * m + n * m) * b,
                f"num_train = {self.num_train:,} (training points)": (self.num_train if dim == 2 else 0) * dim * b}


@dataclass
class MethodResult:
    """One method's curves (against sampler steps) and final state."""

    name: str
    updates: int  # θ updates
    sampler_steps: int  # sampler steps per particle
    eval_steps: np.ndarray  # sampler steps at each evaluation
    mmd_particles: np.ndarray  # MMD²(particles, held-out)
    energy_gap: np.ndarray  # mean V(held-out) − mean V(particles)
    mmd_fresh: float  # MMD²(fresh samples, held-out)
    energy_gap_fresh: float
    particles: np.ndarray  # final particles (N, dim)
    fresh: np.ndarray  # fresh samples (N, dim)
    state: dict[str, Tensor]  # final θ
    wall_time: float  # seconds in training (evaluations excluded)
    density: np.ndarray | None = None  # 2-D: exp(−V) normalised on the grid, (G, G)


@dataclass
class EBMResult:
    config: EBMConfig
    heldout: np.ndarray
    initial: np.ndarray  # the single loop's initial particles, drawn from p₀ (N, dim)
    mmd_data_floor: float  # MMD²(training subsample, held-out)
    methods: dict[str, MethodResult] = field(default_factory=dict)
    grid_extent: tuple[float, float, float, float] | None = None  # (x0, x1, y0, y1) of the densities

    def summary(self) -> dict:
        out: dict = {"data": self.config.data, "mmd_data_floor": self.mmd_data_floor}
        for key, m in self.methods.items():
            out[key] = {
                "updates": m.updates, "sampler_steps": m.sampler_steps,
                "mmd_particles_final": float(m.mmd_particles[-1]), "mmd_fresh": m.mmd_fresh,
                "energy_gap_final": float(m.energy_gap[-1]), "energy_gap_fresh": m.energy_gap_fresh,
                "wall_time_s": m.wall_time,
            }
        return out


def _make_energy(config: EBMConfig, dim: int, dtype: torch.dtype, device: torch.device) -> EnergyMLP:
    """The energy MLP with θ₀ drawn from a generator seeded by the config (the same θ₀ for both
    methods, and on every device: drawn on the CPU, then moved)."""
    net = EnergyMLP(dim, hidden=config.hidden, depth=config.depth).to(dtype)
    return net.reset_parameters(torch.Generator().manual_seed(config.seed + 2)).to(device)


def run(config: EBMConfig, *, metrics_sink: Callable[[list[dict]], None] | None = None,
        checkpoints: Checkpoints | None = None) -> EBMResult:
    """Train with the single loop (and the nested baseline if ``config.compare``); evaluate both.

    With ``checkpoints`` (see :mod:`~implicit_diffusion.runtime.checkpoints`), each method's loop writes a
    checkpoint every ``config.checkpoint_every`` θ updates and on Ctrl-C, or the run continues from a saved one.
    """
    dim = 64 if config.data == "digits" else 2
    with torch_threads(config.num_threads, config.num_particles * dim):
        return _run(config, metrics_sink or (lambda records: None), checkpoints)


def _run(config: EBMConfig, sink, checkpoints: Checkpoints | None = None) -> EBMResult:
    checkpoints = checkpoints or NoCheckpoints()
    dtype, device = getattr(torch, config.dtype), resolve_device(config.device)
    _, init_std, bandwidths, _ = config.resolved()
    # the data (and the minibatch stream, objectives.kl) come from CPU generators: the same on every device
    train, heldout = train_heldout(config.data, config.num_train, config.heldout_size,
                                   generator=torch.Generator().manual_seed(config.seed), dtype=dtype)
    # a resume must train on the data the run trained on (a changed data set would go on silently)
    checkpoints.bind_data("training data", train, f"data set {config.data!r}")
    checkpoints.bind_data("held-out data", heldout, f"data set {config.data!r}")
    train, heldout = train.to(device), heldout.to(device)
    dim = train.shape[1]
    n_floor = min(train.shape[0], heldout.shape[0])
    floor_idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(config.seed + 3))[:n_floor]

    def init_fn(g: torch.Generator | None) -> Tensor:
        return init_std * torch.randn(config.num_particles, dim, generator=g, dtype=dtype, device=device)

    initial = init_fn(generator_on(device, config.seed))  # what the single loop starts from
    result = EBMResult(config, heldout.double().cpu().numpy(), initial.double().cpu().numpy(),
                       float(mmd2(train[floor_idx.to(device)], heldout, bandwidths)))

    budget = config.num_steps * config.sampler_steps_per_update
    methods = [("single", config.num_steps)]
    if config.compare:
        methods.append(("nested", budget * config.nested_budget_factor // config.nested_inner_steps))
    resumed = checkpoints.state if checkpoints.resumed else None
    if resumed:
        checkpoints.require(resumed[1], method=str, train_seconds=float, finished=dict)
        if resumed[1]["method"] not in dict(methods):
            raise DataError(f"{checkpoints.source}: meta 'state.method' is {resumed[1]['method']!r}; this run "
                            f"trains {', '.join(repr(k) for k, _ in methods)}")
    for key, updates in methods:
        if resumed and key in resumed[1]["finished"]:
            result.methods[key] = checkpoints.unpack(resumed[1]["finished"][key], into=MethodResult)
            continue
        resume_here = resumed if resumed and resumed[1]["method"] == key else None
        result.methods[key] = _train(config, key, updates, train, heldout, init_fn, sink,
                                     checkpoints=checkpoints, finished=result.methods, resumed=resume_here)
    if dim == 2:
        _add_densities(result, train)
    return result


def _train(config: EBMConfig, key: str, updates: int, train: Tensor, heldout: Tensor, init_fn, sink, *,
           checkpoints: Checkpoints | NoCheckpoints, finished: dict[str, MethodResult] | None = None,
           resumed: tuple[dict[str, Tensor], dict] | None = None) -> MethodResult:
    """Train one method (``key`` "single" or "nested") for ``updates`` θ updates from θ₀; evaluate it.

    ``checkpoints``: add the checkpoint callback (its state also holds the ``finished`` methods' results);
    ``resumed``: ``(tensors, meta)`` of a checkpoint taken during this method, to continue from.
    """
    gamma, _, bandwidths, alpha = config.resolved()
    potential = _make_energy(config, train.shape[1], train.dtype, train.device)
    batches = torch.Generator().manual_seed(config.seed + 1)  # the same minibatch stream for both methods
    estimator = MinibatchContrastiveKL(train, config.batch_size, generator=batches, energy_penalty=alpha)
    optimizer = torch.optim.Adam(potential.parameters(), lr=config.lr)
    generator = generator_on(train.device, config.seed)
    if key == "single":
        algo = SingleLoop(potential, estimator, optimizer, step_size=gamma,
                          sampler_steps_per_update=config.sampler_steps_per_update)
        spu, x0 = config.sampler_steps_per_update, init_fn(generator)
        label = f"single loop (S={spu})"
    else:
        algo = NestedLoop(potential, estimator, optimizer, init_fn=init_fn,
                          num_inner_steps=config.nested_inner_steps, step_size=gamma)
        spu, x0 = config.nested_inner_steps, None
        label = f"nested (T={spu})"

    def measure(done: int, x: Tensor) -> dict:
        """MMD²(particles, held-out) and the mean energy of held-out data minus the particles'."""
        with torch.no_grad():
            return {"mmd2_particles": float(mmd2(x, heldout, bandwidths)),
                    "energy_gap": float(potential(heldout).mean() - potential(x).mean())}

    # every ``eval_every`` sampler steps, timed (training time leaves it out)
    evaluator = EvalRecorder(measure, config.eval_every, updates, sink, steps_per_update=spu,
                             step_key="sampler_steps", labels={"method": key})
    # everything this method's loop needs to continue bit for bit, but the particles
    parts = {"potential": potential, "optimizer": optimizer, "generator.batches": batches,
             "generator.sampler": generator, "evaluator": evaluator}  # saved as "train.*"
    first, before = 0, 0.0  # θ updates done and training seconds before this process (resume)
    if resumed is not None:
        tensors, saved = resumed
        particles = torch.empty(config.num_particles, train.shape[1], dtype=train.dtype, device="meta")
        checkpoints.restore(parts, saved, "train.", num_steps=updates, like={"train.particles": particles})
        x0, first, before = (tensors["train.particles"].to(train.device, train.dtype), checkpoints.start,
                             saved["train_seconds"])
    elif x0 is not None:
        evaluator.record(0, x0)
    eval_before = evaluator.seconds
    start = time.perf_counter()

    def seconds() -> float:
        """Training time so far, evaluations excluded."""
        return before + time.perf_counter() - start - (evaluator.seconds - eval_before)

    def state(done: int, x: Tensor) -> tuple[dict, dict]:
        """This method's loop, its training time, and the finished methods' results."""
        tensors, meta = state_of(parts, "train.")
        meta.update(method=key, train_seconds=seconds(), finished={})
        for name, m in (finished or {}).items():
            t_m, meta["finished"][name] = pack(m, f"done.{name}")
            tensors.update(t_m)
        return {**tensors, "train.particles": x}, meta

    guard = DivergenceGuard(potential.parameters(), f"a smaller step_size (now {gamma:g}) or lr (now {config.lr:g})")
    bar = ProgressBar(updates, label, enabled=config.progress, initial=first)
    # the guard first: nothing non-finite is evaluated or checkpointed; the checkpoint last: it saves what was recorded
    callbacks = [guard, evaluator, bar, checkpoints.callback(state)]
    # Ctrl-C inside a loop: a checkpoint after the current update; elsewhere (fresh samples) it stops at once
    with checkpoints.catch_interrupts(), bar:
        x = algo.run(x0, updates - first, generator=generator, start=first, callbacks=callbacks)
    wall = seconds()
    # fresh samples from p₀ on the learned energy, with a generator seeded identically for every method
    g = generator_on(train.device, config.seed + 4)
    with torch.no_grad():
        fresh = langevin_chain(init_fn(g), potential, config.fresh_steps, step_size=gamma, generator=g)
        mmd_fresh = float(mmd2(fresh, heldout, bandwidths))
        gap_fresh = float(potential(heldout).mean() - potential(fresh).mean())
    sink([{"method": key, "mmd2_fresh": mmd_fresh, "energy_gap_fresh": gap_fresh, "wall_time_s": wall}])
    return MethodResult(
        name=label, updates=updates, sampler_steps=updates * spu, eval_steps=np.array(evaluator.steps),
        mmd_particles=evaluator.column("mmd2_particles"), energy_gap=evaluator.column("energy_gap"),
        mmd_fresh=mmd_fresh, energy_gap_fresh=gap_fresh, particles=x.double().cpu().numpy().copy(),
        fresh=fresh.double().cpu().numpy().copy(),
        state={k: v.detach().to("cpu", copy=True) for k, v in potential.state_dict().items()}, wall_time=wall,
    )


def _add_densities(result: EBMResult, train: Tensor, size: int = 160) -> None:
    """exp(−V) of each method on a grid around the data, normalised so that Σ p · cell area = 1."""
    pts = train.double().cpu().numpy()
    lo, hi = pts.min(0) - 1.0, pts.max(0) + 1.0
    result.grid_extent = (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))
    for m in result.methods.values():
        net = EnergyMLP(2, hidden=result.config.hidden, depth=result.config.depth).double()
        net.load_state_dict({k: v.double() for k, v in m.state.items()})
        m.density = grid_density(net, lo, hi, size)


Config = EBMConfig


def save(result: EBMResult, run_dir) -> list[str]:
    """Write each method's θ (safetensors), a summary (JSON) and the figures; return the file names."""
    from pathlib import Path

    from ..plotting import ebm as plotting_ebm
    from ..runtime.rundir import write_summary
    from ..serialization import save_tensors

    run_dir = Path(run_dir)
    files = []
    for key, m in result.methods.items():
        save_tensors(run_dir / f"energy_{key}.safetensors", m.state, {"method": m.name})
        files.append(f"energy_{key}.safetensors")
    files.append("summary.json")  # written last, below
    curves = {m.name: (m.eval_steps, m.mmd_particles) for m in result.methods.values()}
    plotting_ebm.plot_mmd_curves(run_dir / "mmd.png", curves, floor=result.mmd_data_floor)
    files.append("mmd.png")
    if result.grid_extent is not None:
        panels = {m.name: (m.density, m.particles) for m in result.methods.values()}
        plotting_ebm.plot_densities(run_dir / "density.png", panels, result.heldout, result.grid_extent)
        files.append("density.png")
    else:
        panels = {"held-out data": result.heldout}
        for m in result.methods.values():
            panels[f"{m.name}: particles"] = m.particles
            panels[f"{m.name}: fresh samples"] = m.fresh
        plotting_ebm.plot_image_grids(run_dir / "samples.png", panels)
        files.append("samples.png")
    write_summary(run_dir, result.summary())  # after the figures: it marks the run complete
    return files


def table(result: EBMResult) -> str:
    """The terminal summary: one row per method."""
    head = f"  {'method':<18} {'updates':>8} {'sampler steps':>13} {'MMD² particles':>15} {'MMD² fresh':>11} " \
           f"{'energy gap':>11} {'wall s':>8}"
    budget = "equal budget" if result.config.nested_budget_factor == 1 else \
        f"nested budget {result.config.nested_budget_factor}× the single loop's"
    rows = [f"  data {result.config.data}; N = {result.config.num_particles} particles for both methods "
            f"({budget}: sampler steps × particles); MMD² floor (train vs held-out) {result.mmd_data_floor:.5f}",
            head]
    for m in result.methods.values():
        rows.append(f"  {m.name:<18} {m.updates:>8} {m.sampler_steps:>13} {m.mmd_particles[-1]:>15.5f} "
                    f"{m.mmd_fresh:>11.5f} {m.energy_gap[-1]:>11.3f} {m.wall_time:>8.1f}")
    return "\n".join(rows)
