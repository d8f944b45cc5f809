"""Experiment ``diffusion-finetune``: reward finetuning of a pretrained diffusion model.

Marion et al. 2024, §5.2: starting from a pretrained score model θ₀, minimise

    F(θ) = −λ E_{x ∼ p_θ}[R(x)] + β KL(path_θ ‖ path_θ₀)

where p_θ is the law of the M-step sampler on the model's VP schedule — DDPM ancestral steps
(default, M = 50) or Euler–Maruyama steps of the reverse SDE (``sampler``), on the grid
t_m = t_min + (T − t_min)(1 − m/M)^ρ (``time_power`` ρ = 2 by default: finer near the data) —
and the path KL is the exact KL of the sampler's Gaussian transitions, Σ_m k_m E‖s_θ − s_θ₀‖²
(Girsanov's ½β(t_m)h_m for Euler–Maruyama; objectives.girsanov.GirsanovKL, score_kl_weights),
swept backwards in the same adjoint pass as the reward. θ is
trained by the queue algorithm (algorithms.queue; pipelined adjoint by default) or the nested
loop. Rewards: ``brightness`` (mean pixel, default, on the shipped digits model) and ``red``
(red minus the other channels, on the shipped colour-patch model). ``--sweep`` repeats the run
for λ/β ∈ ``sweep_ratios`` and draws the reward-vs-KL trade-off.

Checkpoints (``checkpoint_every``, Ctrl-C, ``implicit-diffusion resume``) hold the whole state
of the run in progress — θ and Adam's moments, the generator, the queue's in-flight batches and
pending adjoints, the rewards and evaluations so far — and, in a sweep, which run is in
progress and the finished runs' results, so a resumed run ends bit for bit where an
uninterrupted one would (on the same device).

``device`` (auto, cpu, cuda, cuda:N, mps) holds the model, the queue's batches, the generators
and Adam's state; ``dtype``: float32, float64 (checks), or bfloat16 — the network's forwards
under autocast, float32 master weights (devices.Autocast).
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..algorithms import DIFFUSION_ALGORITHMS
from ..devices import PRECISIONS, Precision, check_device_name, generator_on, resolve_device, resolve_precision
from ..distributed import is_main, rank, world_size
from ..errors import ConfigError, DataError, DivergenceError, NonFiniteError
from ..models.lora import add_lora, has_lora, lora_state_dict, merge_lora
from ..objectives.class_reward import ClassReward, fraction_classified_as, is_class_reward, parse_class_reward
from ..objectives.evaluation import Evaluation, evaluate, rise_in_se, sample_images
from ..objectives.girsanov import path_kl_cost
from ..objectives.image_rewards import IMAGE_REWARDS
from ..runtime.checkpoints import Checkpoints, NoCheckpoints, check_checkpoint_every
from ..runtime.config import explained_errors
from ..runtime.guards import DivergenceGuard
from ..runtime.progress import ProgressBar, status
from ..runtime.recording import EvalRecorder, OrderedSink
from ..runtime.settings import setting
from ..runtime.state import check_state_of, pack, state_of
from ..runtime.tables import key_values
from ..runtime.threads import torch_threads
from ..runtime.validation import check_fields, nonnegative, one_of, positive, short
from ..samplers.blocks import block_generator
from ..samplers.diffusion import DIFFUSION_STEPS
from ..samplers.schedules import VPSchedule

__all__ = ["ALGORITHMS", "PRESETS", "Config", "Result", "RunRecord", "run", "save", "table"]

ALGORITHMS = DIFFUSION_ALGORITHMS
DEFAULT_MODEL = {"brightness": "digits", "red": "photo-patches", "class": "digits"}
CLASS_REWARD = re.compile(r"class:[0-9](@.+)?")  # objectives.class_reward: log p(C | x) of a shipped classifier
SUPPORTS_SHARDING = True  # torchrun: particles / queue slots split over processes
DEFAULT_TIME_POWER = 2.0  # time_power = None on a uniform (continuous) grid: see tests/test_default_sampler.py
SAMPLERS = ("ddpm", "euler-maruyama")  # stochastic steps with an exact path KL (score_kl_weights)


# `run diffusion-finetune --preset NAME`: settings applied before --config and --set
PRESETS: dict[str, dict] = {
    # §5.2 on real MNIST: the shipped 28×28 model, the queue at M = 50 (docs/diffusion-finetune.md)
    "mnist5k": {"model": "mnist5k", "num_sampling_steps": 50, "batch_size": 4, "num_steps": 300},
}


@explained_errors
@dataclass(frozen=True)
class Config:
    model: str | None = setting(None, "a shipped model's name (digits, photo-patches, mnist5k) or a model.safetensors "
                                      "written by `pretrain`; None (the default) = the shipped model for the reward")
    diffusers_model: str | None = setting(None, "instead of model: a local diffusers UNet2DModel + DDPM/DDIM "
                                                "scheduler directory; None (the default) = none")
    reward: str = setting("brightness", "the image reward the finetuning maximises: the mean pixel, the redness, "
                                        "or class:C = log p(C | x) under the shipped digit classifier for the "
                                        "model's image size (class:C@FILE: a classifier file); a class reward also "
                                        "reports the fraction of samples classified as C",
                          allowed=f"{', '.join(IMAGE_REWARDS)}, class:C (C in 0..9), class:C@NAME")
    data: str | None = setting(None, "images on disk to pretrain on first, when no model is given (MNIST IDX/.npz, "
                                     "CIFAR-10, a folder); None (the default) = none")
    trust_pickle: bool = setting(False, "allow reading pickled files (CIFAR-10 python batches) from a trusted source")
    pretrain_steps: int = setting(6_000, "optimizer steps of the pretraining on data (only with data)",
                                         unit="optimizer steps", allowed="> 0")
    algorithm: str = setting("queue-pipelined", "the finetuning algorithm: the queue (pipelined or sequential), "
                                                "the nested loop (adjoint or full backprop), draft-k (backprop "
                                                "through the last draft_k steps; Clark et al. 2024), "
                                                "adjoint-matching (Domingo-Enrich et al. 2025; ddpm, kl_weight > 0)",
                             allowed=ALGORITHMS)
    draft_k: int = setting(1, "draft-k: K, the sampler steps the reward is backpropagated through (the last K; "
                              "K = M is nested-autograd)", unit="sampler steps",
                           allowed="1 to num_sampling_steps; != 1 only with draft-k")
    sampler: str = setting("ddpm", "the sampler step: ddpm (ancestral) or euler-maruyama (reverse SDE)",
                                   allowed=SAMPLERS)
    num_sampling_steps: int = setting(50, "M, sampler steps per sample", unit="sampler steps", allowed="> 0")
    time_power: float | None = setting(None, "ρ of the sampling grid t_min + (T − t_min)(1 − m/M)^ρ (1: uniform; "
                                             "> 1: finer near 0); None (the default) = the model's default: ρ = 2 on "
                                             "a built-in model's continuous schedule, a diffusers scheduler's own "
                                             "timestep spacing", allowed="None or a number > 0")
    lora_rank: int | None = setting(None, "LoRA: train rank-r adapters W + (α/r)·B A on every Linear and Conv2d "
                                          "weight (α = r) instead of all weights; the written model has them "
                                          "merged, the adapters are also written alone; None (the default) = "
                                          "finetune every weight", allowed="None or an integer > 0")
    batch_size: int = setting(16, "samples per queue slot (per update for the nested loop)",
                                  unit="samples", allowed="> 0")
    num_steps: int = setting(250, "iterations (the pipelined queue's θ updates begin once it is full, at iteration "
                                  "2(M − 1)); the default reward has plateaued by 250 (docs/diffusion-finetune.md)",
                             unit="iterations", allowed="> 0")
    reward_weight: float = setting(30.0, "λ, the weight of the reward in λ·reward − β·KL", allowed=">= 0")
    kl_weight: float = setting(1.0, "β, the weight of the KL to the pretrained model", allowed=">= 0")
    lr: float = setting(1e-4, "Adam's learning rate", allowed="> 0")
    max_grad_norm: float = setting(1.0, "clip the gradient's norm to at most this", allowed="> 0")
    eval_every: int = setting(100, "iterations between evaluations of the reward and KL",
                                   unit="iterations", allowed="> 0")
    eval_samples: int = setting(256, "independent samples per evaluation", allowed=">= 2")
    grid_images: int = setting(32, "images in each saved grid of samples", allowed="> 0")
    sweep: bool = setting(False, "run once per λ/β of sweep_ratios (needs kl_weight > 0) instead of once")
    sweep_ratios: tuple[float, ...] = setting((10.0, 100.0, 1000.0), "the λ/β values of sweep", allowed="numbers > 0")
    seed: int = setting(0, "random seed")
    num_threads: int | None = setting(None, "CPU threads of torch; None (the default) = automatic: torch's default",
                                      allowed="None or an integer from 1 to this machine's CPU count")
    progress: bool = setting(True, "show a progress bar on the terminal")
    checkpoint_every: int | None = setting(None, "iterations between checkpoints, counted in each run of a sweep; "
                                                 "None (the default) = only on Ctrl-C, SIGTERM or SIGHUP",
                                           unit="iterations", allowed="None or an integer >= 1")
    max_batch: int | None = setting(None, "queue: the most samples per network call (chunks of the M·B in flight); "
                                          "None (the default) = all in one call",
                                    unit="samples", allowed="None or an integer >= 1; only with a queue algorithm")
    queue_fill: str = setting("wait", "pipelined queue: \"wait\" = no θ update until its gradient is complete; "
                                      "\"partial\" = the fill's partial gradients update θ too",
                                      allowed=("wait", "partial"))
    queue_tail: str = setting("drop", "pipelined queue, after the last iteration: \"drop\" the adjoints in flight or "
                                      "\"apply\" them", allowed=("drop", "apply"))
    device: str = setting("auto", "where the run computes: auto (CUDA when available, else CPU), cpu, cuda, cuda:N "
                                  "or mps")
    dtype: str = setting("float32", "float32, float64 (checks) or bfloat16 (autocast forwards, float32 master "
                                    "weights)", allowed=PRECISIONS)

    def __post_init__(self) -> None:
        check_fields(self)  # finite numbers, int64 integers, seed and num_threads bounds (runtime.validation)
        if not CLASS_REWARD.fullmatch(self.reward):
            one_of(self, "reward", [*IMAGE_REWARDS, "class:C (C in 0..9)", "class:C@NAME"])
        one_of(self, "algorithm", ALGORITHMS)
        for key in ("model", "diffusers_model", "data"):
            if getattr(self, key) is not None and not getattr(self, key).strip():
                raise ConfigError(f"config key {key!r} must name a model or a path, or be None (the default), got "
                                  f"an empty string")
        if sum(v is not None for v in (self.model, self.data, self.diffusers_model)) > 1:
            raise ConfigError("give at most one of model (a pretrained file), diffusers_model (a diffusers "
                              "directory) and data (images to pretrain on)")
        for key in ("time_power", "max_batch"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"config key {key!r} must be None (the default) or > 0, got {getattr(self, key)}")
        if self.lora_rank is not None and not self.lora_rank > 0:
            raise ConfigError(f"config key 'lora_rank' must be None (finetune every weight) or an integer > 0, "
                              f"got {self.lora_rank}")
        one_of(self, "sampler", SAMPLERS)
        positive(self, "pretrain_steps", "num_sampling_steps", "batch_size", "num_steps", "lr", "eval_every",
                 "eval_samples", "grid_images", "max_grad_norm")
        if self.eval_samples < 2:
            raise ConfigError(f"config key 'eval_samples' must be >= 2 (for a standard error), got {self.eval_samples}")
        nonnegative(self, "reward_weight", "kl_weight")
        if self.sweep and (not self.sweep_ratios or any(not r > 0 for r in self.sweep_ratios)):
            raise ConfigError(f"config key 'sweep_ratios' must be positive numbers, got {short(self.sweep_ratios)}")
        if self.sweep and not self.kl_weight > 0:
            raise ConfigError("--sweep varies λ/β: it needs kl_weight > 0")
        if self.max_batch is not None and not self.algorithm.startswith("queue"):
            raise ConfigError(f"config key 'max_batch' chunks the queue's batched calls; algorithm "
                              f"{self.algorithm!r} runs one batch at a time (leave max_batch out: None)")
        check_checkpoint_every(self.checkpoint_every)
        if not 1 <= self.draft_k <= self.num_sampling_steps:
            raise ConfigError(f"config key 'draft_k' must be from 1 to num_sampling_steps = {self.num_sampling_steps}, "
                              f"got {self.draft_k}")
        if self.algorithm == "adjoint-matching" and not (self.kl_weight > 0 and self.sampler == "ddpm"):
            raise ConfigError(f"algorithm 'adjoint-matching' samples the tilt p₀·e^{{(λ/β)R}} with DDPM's memoryless "
                              f"steps: it needs kl_weight > 0 and sampler = 'ddpm', got kl_weight = "
                              f"{self.kl_weight:g}, sampler = {self.sampler!r}")
        if self.draft_k != 1 and self.algorithm != "draft-k":
            raise ConfigError(f"config key 'draft_k' is the K of algorithm draft-k; algorithm {self.algorithm!r} "
                              f"backpropagates through all steps (leave draft_k at 1)")
        check_device_name(self.device)
        one_of(self, "dtype", PRECISIONS)
        one_of(self, "queue_fill", ("wait", "partial"))
        one_of(self, "queue_tail", ("drop", "apply"))
        for key, default in (("queue_fill", "wait"), ("queue_tail", "drop")):
            if getattr(self, key) != default and self.algorithm != "queue-pipelined":
                raise ConfigError(f"config key {key!r} sets the edges of the pipelined queue; algorithm "
                                  f"{self.algorithm!r} has none (leave it at {default!r})")

    @property
    def reward_name(self) -> str:
        """The reward as tables and figures name it: ``brightness``, ``red``, ``log p(C | x)``."""
        return f"log p({self.reward[6]} | x)" if is_class_reward(self.reward) else self.reward

    @property
    def reward_family(self) -> str:
        """``brightness``, ``red`` or ``class`` (any ``class:C``)."""
        return "class" if is_class_reward(self.reward) else self.reward

    def memory_estimate(self) -> dict[str, int]:
        """Bytes of the dominant allocations, a rough lower bound (:mod:`~implicit_diffusion.runtime.memory`):
        the M + 1 states of every evaluation sample (kept for the path KL), of the samples in flight
        (M·B in the queue, B unrolled in the nested loop) and of the image grid. Images have the shipped
        model's size (1×8×8 digits, 3×8×8 photo patches, 1×28×28 mnist5k); a model of unknown size
        counts one number per image."""
        b = 8 if self.dtype == "float64" else 4
        model = self.model or (None if self.data or self.diffusers_model else DEFAULT_MODEL.get(self.reward_family))
        pixels = {"digits": 64, "photo-patches": 192, "mnist5k": 784}.get(model, 1)
        states = (self.num_sampling_steps + 1) * pixels * b
        return {f"eval_samples = {self.eval_samples:,} ({self.num_sampling_steps + 1} states of {pixels} numbers "
                f"per sample)": self.eval_samples * states,
                f"batch_size = {self.batch_size:,} (the samples in flight, {self.num_sampling_steps + 1} states "
                f"of {pixels} numbers each)": self.batch_size * states * (self.num_sampling_steps
                                                                          if self.algorithm.startswith("queue") else 1),
                f"grid_images = {self.grid_images:,} (images of the figure)": self.grid_images * states}


@dataclass
class RunRecord:
    """One finetuning run (one λ/β)."""

    label: str
    reward_weight: float
    kl_weight: float
    train_reward: np.ndarray  # exiting batch's mean reward per iteration (NaN while the queue fills)
    evals: dict[str, list[float]]  # step, reward, reward_se, kl, kl_se
    grids: list[tuple[int, torch.Tensor]]  # (iterations, images) on fixed noise
    state: dict[str, torch.Tensor]  # finetuned weights (on the CPU)
    wall_time: float
    edges: dict = field(default_factory=dict)  # pipelined queue: fill, tail, contributions dropped or applied


@dataclass
class Result:
    config: Config
    model_source: str
    schedule: VPSchedule
    base: Evaluation  # the pretrained model, independent samples
    runs: list[RunRecord] = field(default_factory=list)
    model: torch.nn.Module | None = None  # architecture (weights: the last run's)
    shape: tuple[int, ...] = ()  # one sample's shape
    diffusers: object | None = None  # the LoadedDiffusers a --diffusers-model run started from
    base_fraction: float | None = None  # class reward: the pretrained samples' fraction classified as C

    def final(self, r: RunRecord) -> Evaluation:
        return Evaluation(*(r.evals[k][-1] for k in ("reward", "reward_se", "kl", "kl_se")))

    def summary(self) -> dict:
        c, sch = self.config, self.schedule
        out = {"model": self.model_source, "reward": c.reward, "algorithm": c.algorithm, "sampler": c.sampler,
               "num_sampling_steps": sch.num_steps, "time_power": sch.time_power, "spacing": sch.spacing,
               "pretrained_reward": self.base.reward, "pretrained_reward_se": self.base.reward_se, "runs": []}
        if self.base_fraction is not None:
            out["pretrained_fraction_classified"] = self.base_fraction
        for r in self.runs:
            f = self.final(r)
            out["runs"].append({"label": r.label, "reward_weight": r.reward_weight, "kl_weight": r.kl_weight,
                                "reward": f.reward, "reward_se": f.reward_se, "kl": f.kl, "kl_se": f.kl_se,
                                "rise_in_se": rise_in_se(self.base, f), "wall_time_s": r.wall_time,
                                **({"fraction_classified": r.evals["fraction_classified"][-1]}
                                   if "fraction_classified" in r.evals else {}),
                                **({"queue_edges": r.edges} if r.edges else {})})
        return out


def _load_model(config: Config, metrics_sink):
    """(network, schedule, data shape, source, LoadedDiffusers or None) of the model to finetune."""
    from ..pretrained import PRETRAINED
    from ..pretrained.loading import load_diffusion_model

    if config.diffusers_model:
        from ..models.diffusers_adapter import load_diffusers

        loaded = load_diffusers(config.diffusers_model)
        return loaded.model, loaded.schedule, loaded.shape, f"diffusers model {config.diffusers_model}", loaded
    if config.data:
        from . import pretrain

        pre = pretrain.run(pretrain.Config(dataset="images", data=config.data, trust_pickle=config.trust_pickle,
                                           num_steps=config.pretrain_steps, seed=config.seed,
                                           progress=config.progress, device=config.device, dtype=config.dtype),
                         metrics_sink=metrics_sink)
        return pre.model, pre.schedule, tuple(pre.data_sample.shape[1:]), f"pretrained here on {config.data}", None
    model = load_diffusion_model(config.model or DEFAULT_MODEL[config.reward_family])
    if len(model.data_shape) != 3 or not hasattr(model.net, "in_channels"):
        # found here, not deep inside the image reward at the first step
        raise ConfigError(f"config key 'model': {model.source} makes samples of shape {model.data_shape}, "
                          f"diffusion-finetune needs images (C, H, W); use a shipped image model "
                          f"({', '.join(PRETRAINED)}) or one from `implicit-diffusion pretrain "
                          f"digits|mnist|cifar10|images` instead")
    return model.net, model.schedule, model.data_shape, model.source, None


def run(config: Config, *, metrics_sink=None, checkpoints: Checkpoints | None = None) -> Result:
    """Run the experiment; ``metrics_sink`` receives JSON-ready records as they come.

    With ``checkpoints`` (see :mod:`~implicit_diffusion.runtime.checkpoints`), each run writes a checkpoint every
    ``config.checkpoint_every`` iterations and on Ctrl-C, or the sweep continues from a saved one.
    """
    with torch_threads(config.num_threads):
        return _run(config, metrics_sink or (lambda records: None), checkpoints)


def _run(config: Config, sink, checkpoints: Checkpoints | None) -> Result:
    checkpoints = checkpoints or NoCheckpoints()
    if config.batch_size % world_size():
        raise ConfigError(f"with {world_size()} processes, config key 'batch_size' must be a multiple of "
                          f"{world_size()} (each process holds batch_size/{world_size()} of every batch), "
                          f"got {config.batch_size}")
    resumed = checkpoints.state if checkpoints.resumed else None
    # on resume, pretraining (--data) is redone from its seed; its records are already in the metrics
    device = resolve_device(config.device)
    precision = resolve_precision(config.dtype, device)
    model, trained_schedule, shape, source, diffusers = _load_model(config, sink if resumed is None else
                                                                    (lambda records: None))
    if config.lora_rank is not None:  # before anything snapshots θ (θ₀ of the path KL, the resume check)
        add_lora(model, config.lora_rank, generator=torch.Generator().manual_seed(config.seed + 3))
    model = model.to(device=device, dtype=precision.dtype).train(False)
    net = precision.wrap(model)  # what the sampler calls: model itself, or its forward under autocast
    reward_fn = (parse_class_reward(config.reward, shape, device=device) if is_class_reward(config.reward)
                 else IMAGE_REWARDS[config.reward])
    if config.reward == "red" and shape[0] != 3:
        raise ConfigError(f"the red reward needs a colour (3-channel) model; {source} has {shape[0]} channel(s)")
    try:
        power = config.time_power
        if power is None:
            power = DEFAULT_TIME_POWER if trained_schedule.spacing == "uniform" else 1.0
        schedule = replace(trained_schedule, num_steps=config.num_sampling_steps, time_power=power)
    except ValueError as e:  # e.g. more sampling steps than a diffusers scheduler's training grid has
        raise ConfigError(f"the sampling grid (config keys 'num_sampling_steps' = {config.num_sampling_steps}, "
                          f"'time_power' = {config.time_power}) does not fit {source}: "
                          f"{e}") from None
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # a resume must start from the weights the run started from (a model file, a diffusers directory or a
    # pretraining on --data changed since would go on silently)
    checkpoints.bind_data("starting model's weights", initial, source)
    step = DIFFUSION_STEPS[config.sampler]
    if resumed is None:
        kl0 = path_kl_cost(net, schedule, 1.0, step)
        with status(f"evaluating the pretrained model ({config.eval_samples} samples, {schedule.num_steps} steps)",
                    enabled=config.progress and is_main()):
            base, samples = evaluate(net, step, schedule, shape, config.eval_samples, reward_fn=reward_fn,
                                     kl=kl0, generator=generator_on(device, config.seed + 1),
                                     prediction=model.prediction, dtype=precision.dtype)
        base_fraction = _classified(reward_fn, samples).get("fraction_classified")
    else:
        check_state_of({}, resumed[0], {}, like={"base": torch.empty(len(Evaluation._fields), dtype=torch.float64)},
                       source=checkpoints.source, exhaustive=False)
        base = Evaluation(*resumed[0]["base"].tolist())
        base_fraction = float(resumed[0]["base_fraction"]) if "base_fraction" in resumed[0] else None
    result = Result(config, source, schedule, base, model=model, shape=shape, diffusers=diffusers,
                    base_fraction=base_fraction)
    weights = [r * config.kl_weight for r in config.sweep_ratios] if config.sweep else [config.reward_weight]
    first = 0
    if resumed is not None:
        tensors, meta = resumed
        checkpoints.require(meta, run_index=int, finished=list, run=dict)
        first = meta["run_index"]
        result.runs = checkpoints.unpack(meta["finished"], into=RunRecord, many=True)
        if not 0 <= first < len(weights) or len(result.runs) != first:
            raise DataError(f"{checkpoints.source}: meta 'state.run_index' must be the number of finished runs "
                            f"({len(result.runs)}), below the sweep's {len(weights)}; got {first}")

    def sweep_state() -> tuple[dict[str, torch.Tensor], dict]:
        """The sweep's part of a checkpoint: the base evaluation, the finished runs, the run in progress."""
        tensors, finished = pack(result.runs, "finished")
        tensors["base"] = torch.tensor(list(base), dtype=torch.float64)
        if base_fraction is not None:
            tensors["base_fraction"] = torch.tensor(base_fraction, dtype=torch.float64)
        return tensors, {"run_index": len(result.runs), "finished": finished}

    with checkpoints.catch_interrupts():
        for i, lam in enumerate(weights[first:], start=first):
            model.load_state_dict(initial)  # θ₀ of the path KL, also for a resumed run (θ is loaded later)
            result.runs.append(_finetune(config, model, net, precision, schedule, shape, reward_fn, lam, sink,
                                         checkpoints=checkpoints, sweep_state=sweep_state,
                                         resumed=resumed if i == first else None))
    return result


def _classified(reward_fn, samples: torch.Tensor) -> dict[str, float]:
    """A class reward's ``{"fraction_classified": fraction of the samples classified as C}``; else ``{}``."""
    if isinstance(reward_fn, ClassReward):
        return {"fraction_classified": fraction_classified_as(reward_fn, samples, reward_fn.target)}
    return {}


def _finetune(config: Config, model, net, precision: Precision, schedule, shape, reward_fn, lam: float, sink, *,
              checkpoints: Checkpoints | NoCheckpoints, sweep_state=lambda: ({}, {}),
              resumed: tuple[dict[str, torch.Tensor], dict] | None = None) -> RunRecord:
    """One run (one λ) of ``model`` (θ), whose forward is ``net`` (``model`` or its autocast).
    ``resumed``: a checkpoint taken during this run, to continue from; ``sweep_state() -> (tensors,
    meta)``: the rest of the sweep, saved with each checkpoint."""
    beta = config.kl_weight
    label = f"λ/β = {lam / beta:g}" if beta > 0 else f"λ = {lam:g}, β = 0"
    cls, options = ALGORITHMS[config.algorithm]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    step = DIFFUSION_STEPS[config.sampler]
    running_cost = path_kl_cost(net, schedule, beta, step) if beta > 0 else None  # θ₀: the weights now
    kl_eval = running_cost or path_kl_cost(net, schedule, 1.0, step)
    device, dtype = params[0].device, precision.dtype
    algo = cls(net, step, schedule, optimizer,
               init_fn=lambda gen: torch.randn((config.batch_size // world_size(), *shape), generator=gen,
                                               device=device, dtype=dtype),
               reward_fn=reward_fn, reward_weight=lam, running_cost=running_cost, prediction=model.prediction,
               max_grad_norm=config.max_grad_norm, **options,
               **({"fill": config.queue_fill, "tail": config.queue_tail}
                  if config.algorithm == "queue-pipelined" else {}),
               **({"max_batch": config.max_batch} if config.max_batch is not None else {}),
               **({"last_k": config.draft_k} if config.algorithm == "draft-k" else {}),
               **({"kl_weight": beta} if config.algorithm == "adjoint-matching" else {}))
    # under torchrun each process holds batch_size / W of every batch, with its own random stream
    generator = block_generator(config.seed, rank(), world_size(), device)
    train = np.full(config.num_steps, np.nan)  # the exiting batch's mean reward per iteration

    def measure(done: int, _x) -> dict:
        """Reward and path KL of fresh samples, each ± SE (independent noise at every evaluation)."""
        ev, samples = evaluate(net, step, schedule, shape, config.eval_samples, reward_fn=reward_fn,
                               kl=kl_eval, generator=generator_on(device, config.seed + 1000 + done),
                               prediction=model.prediction, dtype=dtype)
        return {**ev._asdict(), **_classified(reward_fn, samples)}

    def grid(done: int, _x) -> torch.Tensor:  # the same noise at every grid: rows are comparable across steps
        return sample_images(net, step, schedule, shape, config.grid_images,
                             generator=generator_on(device, config.seed + 2), prediction=model.prediction,
                             dtype=dtype)[-1].cpu()

    # the one ordering point: the per-step rewards held below go out before any later record (step order)
    ordered = OrderedSink(sink)
    evals = EvalRecorder(measure, config.eval_every, config.num_steps, ordered, step_key="eval_step",
                         labels={"run": label}, snapshot=grid,
                         snapshot_steps={0, config.num_steps // 3, 2 * config.num_steps // 3, config.num_steps})
    written = recorded = 0  # per-step rewards handed to the sink / recorded

    def flush(upto: int) -> None:  # per-step rewards go out in blocks, so a crash keeps all but the last
        nonlocal written
        sink([{"run": label, "step": k, "reward": None if np.isnan(train[k]) else float(train[k])}
              for k in range(written, upto)])
        written = upto

    ordered.hold(lambda: flush(recorded))

    def record(k: int, _x, stats: dict) -> None:
        nonlocal recorded
        if "reward" in stats:
            train[k] = float(stats["reward"])
        recorded = k + 1
        if (k + 1) % 100 == 0:
            flush(k + 1)

    edges: dict = {}

    def drain(k: int, _x, stats: dict) -> None:
        """After the last iteration, the pipelined queue's tail: dropped or applied (then the final
        evaluation sees the drained θ); both counted in the summary."""
        if k == config.num_steps - 1 and hasattr(algo, "drain") and algo.adjoint == "pipelined":
            pending = algo.pending_contributions()
            edges.update(fill=algo.fill, tail=algo.tail, tail_contributions=pending, drain_updates=algo.drain())

    parts = {"algo": algo, "generator": generator, "evals": evals}  # saved as "run.*"
    elapsed = 0.0  # wall time before a resume

    def state(done: int, _x) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything this run needs to continue after ``done`` iterations, bit for bit, plus the
        sweep's state. Per-step rewards not yet handed to the sink stay in the checkpoint (the
        metrics file is cut back to its length now), so the blocks are those of a run without
        checkpoints."""
        tensors, meta = state_of(parts, "run.")
        t_s, m_s = sweep_state()
        run = {**meta, "written": written, "wall_time": elapsed + time.perf_counter() - start}
        return {**t_s, **tensors, "run.train": torch.from_numpy(train.copy())}, {**m_s, "run": run}

    first = 0
    if resumed is not None:
        tensors, meta = resumed
        checkpoints.require(meta["run"], "state.run", written=int, wall_time=float)
        # θ by name, shape and dtype before anything is loaded (the algorithm saves it as run.algo.model.*)
        theta = {f"run.algo.model.{k}": v for k, v in model.state_dict().items()}
        checkpoints.restore(parts, meta["run"], "run.", num_steps=config.num_steps,
                            like={**theta, "run.train": torch.from_numpy(train)})
        train[:] = tensors["run.train"].numpy()
        first = recorded = checkpoints.start
        elapsed, written = meta["run"]["wall_time"], meta["run"]["written"]
        if not 0 <= written <= first:
            raise DataError(f"{checkpoints.source}: meta 'state.run.written' must be from 0 to the step {first}, "
                            f"got {written}")
    else:
        with status(f"{label}: the first evaluation ({config.eval_samples} samples) and sample grid",
                    enabled=config.progress and is_main()):
            evals.record(0, None)
    start = time.perf_counter()
    try:
        with ProgressBar(config.num_steps, f"finetune {label}", enabled=config.progress and is_main(), chunk=10,
                         initial=first) as bar:
            # the checkpoint last: it saves what the others recorded
            hint = f"a smaller lr (now {config.lr:g}) or max_grad_norm (now {config.max_grad_norm:g})"
            guard = DivergenceGuard(params, hint)  # first: nothing non-finite is recorded or checkpointed
            callbacks = [drain, guard, record, evals, bar, checkpoints.callback(state)]
            try:
                algo.run(config.num_steps - first, generator=generator, start=first, callbacks=callbacks)
            except NonFiniteError as e:  # the weights are finite but already produce inf/NaN samples
                raise DivergenceError(f"the finetuning diverged at iteration {recorded + 1}: {e}. Try {hint}.") from e
    except BaseException:  # a crashed or interrupted run still leaves every recorded step in the metrics
        flush(recorded)
        raise
    wall = elapsed + time.perf_counter() - start
    flush(config.num_steps)
    return RunRecord(label, lam, beta, train, {"step": evals.steps, **evals.values}, list(evals.snapshots.items()),
                     {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, wall, edges)


def save(result: Result, run_dir) -> list[str]:
    """Write the finetuned model(s), sample grids, curves (and the trade-off for a sweep), then,
    last, summary.json; return the file names."""
    from ..models.io import save_score_model
    from ..plotting.diffusion import plot_finetune_curves, plot_image_grids, plot_tradeoff
    from ..runtime.rundir import write_summary
    from ..serialization import save_tensors

    run_dir = Path(run_dir)
    files = []
    reward = result.config.reward_name
    for i, r in enumerate(result.runs):
        suffix = "" if len(result.runs) == 1 else f"-{i}"
        result.model.load_state_dict(r.state)
        written = result.model
        if has_lora(result.model):  # the adapters alone, then the model with them merged
            save_tensors(run_dir / f"lora{suffix}.safetensors", lora_state_dict(result.model),
                         {"format": "implicit-diffusion/lora", "rank": str(result.config.lora_rank),
                          "base": result.model_source})
            files.append(f"lora{suffix}.safetensors")
            written = merge_lora(copy.deepcopy(result.model))
        if result.diffusers is not None:  # back in diffusers' own format (save_pretrained, safetensors)
            from ..models.diffusers_adapter import save_diffusers

            save_diffusers(result.diffusers, written, result.config.diffusers_model,
                           run_dir / f"diffusers{suffix}")
            files.append(f"diffusers{suffix}/")
        else:
            save_score_model(run_dir / f"finetuned{suffix}.safetensors", written, result.schedule,
                             extra={"base": result.model_source, "data_shape": list(result.shape),
                                    "reward": result.config.reward, "reward_weight": r.reward_weight,
                                    "kl_weight": r.kl_weight, "algorithm": result.config.algorithm})
            files.append(f"finetuned{suffix}.safetensors")
        plot_image_grids(run_dir / f"samples{suffix}.png",
                         [(f"iteration {s}" + (" (pretrained)" if s == 0 else ""), imgs) for s, imgs in r.grids],
                         title=f"{reward} finetuning, {r.label} (same noise in every panel)")
        files.append(f"samples{suffix}.png")
    plot_finetune_curves(run_dir / "curves.png", {r.label: {k: np.asarray(v) for k, v in r.evals.items()}
                                                  for r in result.runs}, reward_name=reward)
    files.append("curves.png")
    if len(result.runs) > 1:
        plot_tradeoff(run_dir / "tradeoff.png", {r.label: (lambda f: (f.kl, f.kl_se, f.reward, f.reward_se))(
            result.final(r)) for r in result.runs}, reward_name=reward, base_reward=result.base.reward)
        files.append("tradeoff.png")
    return [*files, write_summary(run_dir, result.summary())]  # last: it marks the run complete


def table(result: Result) -> str:
    """The terminal summary: the pretrained reward, then each run's reward (rise in SE) and path KL."""
    b = result.base
    c, sch = result.config, result.schedule
    grid = f"grid power ρ = {sch.time_power:g}" if sch.spacing == "uniform" else f"'{sch.spacing}' timesteps"
    rows = [("model", result.model_source),
            ("sampler", f"{c.sampler}, M = {sch.num_steps} steps, {grid}"),
            (f"pretrained: mean {c.reward_name} (± SE)", f"{b.reward:.4f} ± {b.reward_se:.4f}")]
    for r in result.runs:
        f = result.final(r)
        rows.append((f"{r.label}: {c.reward_name} / path KL",
                     f"{f.reward:.4f} ± {f.reward_se:.4f} (rise {rise_in_se(b, f):+.1f} SE) / "
                     f"{f.kl:.3f} ± {f.kl_se:.3f}   [{r.wall_time:.0f} s]"))
    if result.base_fraction is not None:
        target = c.reward[6]
        after = ", ".join(f"{r.evals['fraction_classified'][-1]:.1%}" for r in result.runs)
        rows.append((f"samples classified as {target}: pretrained → finetuned",
                     f"{result.base_fraction:.1%} → {after}"))
    edges = next((r.edges for r in result.runs if r.edges), None)
    if edges:
        m = result.config.num_sampling_steps
        fill = (f"no θ update before iteration {2 * (m - 1)} (complete gradients only)" if edges["fill"] == "wait"
                else f"the first {m - 1} updates are partial gradients")
        tail = (f"{edges['tail_contributions']} batch-step contributions still in flight at the end "
                + ("dropped" if edges["tail"] == "drop" else f"applied in {edges['drain_updates']} drain updates"))
        rows.append(("pipelined queue: fill / tail", f"{fill} / {tail}"))
    return key_values(rows)
