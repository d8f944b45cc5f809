"""Job ``pretrain``: train a score model by denoising score matching and save it (safetensors).

``implicit-diffusion pretrain DATASET`` with DATASET one of

- the 2-D targets ``moons``, ``swiss-roll``, ``rings``, ``gaussian-mixture`` (a :class:`ScoreMLP`);
- ``digits`` (scikit-learn's 1,797 8×8 digits) or ``photo-patches`` (colour patches cut from
  scikit-learn's sample photographs) — a small :class:`UNet`;
- ``mnist``, ``cifar10`` or ``images``: read from ``--data PATH`` (MNIST IDX/.npz, CIFAR-10
  .npz or, with ``--trust-pickle``, its python batches, or a folder of images).

The loss is the multi-level DSM loss with λ(t) = σ(t)² on a VP schedule (training/dsm.py); the
saved weights are the EMA θ̄ (training/pretrain.py). Outputs: ``model.safetensors`` (loadable by
:func:`~implicit_diffusion.models.io.load_score_model` and by ``run diffusion-finetune --set
model=...``), the loss curve, samples of the EMA model next to data.

Checkpoints (``--checkpoint-every N``, and Ctrl-C) hold θ, θ̄, Adam's state, the generator and
the losses so far; ``implicit-diffusion resume RUN_DIR`` continues bit for bit. A non-finite θ
stops the run at once (:class:`~implicit_diffusion.errors.DivergenceError`, suggesting a smaller lr).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.builtin import TWO_D_DATASETS
from ..devices import PRECISIONS, Autocast, check_device_name, generator_on, resolve_device, resolve_precision
from ..errors import ConfigError
from ..runtime.checkpoints import Checkpoints, NoCheckpoints, check_checkpoint_every
from ..runtime.config import explained_errors
from ..runtime.guards import DivergenceGuard
from ..runtime.progress import ProgressBar
from ..runtime.settings import setting
from ..runtime.tables import key_values
from ..runtime.threads import torch_threads
from ..runtime.validation import check_fields, one_of, positive, short
from ..samplers.schedules import SCHEDULE_KINDS, VPSchedule

__all__ = ["DATASETS", "Config", "Result", "run", "save", "table", "load_training_data", "build_model"]

IMAGE_DATASETS = ("digits", "photo-patches", "mnist5k")
FILE_DATASETS = ("mnist", "cifar10", "images")
DATASETS = TWO_D_DATASETS + IMAGE_DATASETS + FILE_DATASETS


def _unet_groups() -> int:
    """The GroupNorm groups of the U-Net :func:`build_model` makes (its default): its widths must be multiples."""
    import inspect

    from ..models.unet import UNet

    return inspect.signature(UNet).parameters["groups"].default


@explained_errors
@dataclass(frozen=True)
class Config:
    dataset: str = setting("digits", "the data set to learn (mnist, cifar10 and images are read from data)",
                                     allowed=DATASETS)
    data: str | None = setting(None, "path of the images, for mnist, cifar10 and images; None (the default) = "
                                     "none (the built-in data sets)")
    trust_pickle: bool = setting(False, "allow reading pickled files (CIFAR-10 python batches) from a trusted source")
    limit: int | None = setting(None, "keep only the first N images of a file data set, or N random ones of mnist5k; "
                                      "None (the default): all", unit="images", allowed=">= 1")
    num_points: int = setting(20_000, "2-D points or photo patches drawn", unit="points", allowed="> 0")
    patch_size: int = setting(8, "side of the photo patches", unit="pixels", allowed="> 0")
    schedule: str = setting("linear", "the VP noise schedule", allowed=SCHEDULE_KINDS)
    num_steps: int = setting(6_000, "optimizer steps", unit="optimizer steps", allowed="> 0")
    batch_size: int = setting(128, "minibatch size", unit="samples", allowed="> 0")
    lr: float = setting(2e-3, "Adam's learning rate", allowed="> 0")
    ema_decay: float = setting(0.999, "decay of the exponential moving average of the weights (the saved model)",
                                      allowed="in [0, 1)")
    max_grad_norm: float = setting(1.0, "clip the gradient's norm to at most this", allowed="> 0")
    base_channels: int = setting(16, "U-Net width: channels of its first level (images)",
                                     allowed="> 0, a multiple of the U-Net's GroupNorm groups")
    channel_mults: tuple[int, ...] = setting((1, 2, 2), "the U-Net's channel multiplier per level; each level after "
                                                        "the first halves H and W", allowed="integers >= 1")
    hidden: int = setting(256, "MLP width (2-D data)", allowed="> 0")
    num_samples: int = setting(64, "images drawn from the EMA model for the figure (2-D data: 2,000 points)",
                                   allowed="> 0")
    sampling_steps: int = setting(100, "sampler steps of those samples", unit="sampler steps", allowed="> 0")
    seed: int = setting(0, "random seed")
    num_threads: int | None = setting(None, "CPU threads of torch; None (the default) = automatic: torch's default",
                                      allowed="None or an integer from 1 to this machine's CPU count")
    progress: bool = setting(True, "show a progress bar on the terminal")
    checkpoint_every: int | None = setting(None, "optimizer steps between checkpoints; None (the default) = only "
                                                 "on Ctrl-C, SIGTERM or SIGHUP", unit="optimizer steps",
                                           allowed="None or an integer >= 1")
    device: str = setting("auto", "where the run computes: auto (CUDA when available, else CPU), cpu, cuda, cuda:N "
                                  "or mps")
    dtype: str = setting("float32", "float32, float64 or bfloat16 (autocast forwards, float32 master weights)",
                                    allowed=PRECISIONS)

    def __post_init__(self) -> None:
        check_fields(self)  # finite numbers, int64 integers, seed and num_threads bounds (runtime.validation)
        check_device_name(self.device)
        one_of(self, "dtype", PRECISIONS)
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown data set {self.dataset!r}; allowed: {', '.join(DATASETS)}")
        if self.data is not None and not self.data.strip():
            raise ConfigError("config key 'data' must be a path or None (the default), got an empty string")
        if self.dataset in FILE_DATASETS and not self.data:
            raise ConfigError(f"data set {self.dataset!r} is read from disk: pass --data PATH")
        if self.data and self.dataset not in FILE_DATASETS:
            raise ConfigError(f"--data is for the data sets {', '.join(FILE_DATASETS)}, not {self.dataset!r}")
        if self.schedule not in SCHEDULE_KINDS:
            raise ConfigError(f"config key 'schedule': unknown {self.schedule!r}; allowed: {', '.join(SCHEDULE_KINDS)}")
        # max_grad_norm <= 0 made the clipping scale negative (training ran uphill) or zero (no step at all)
        positive(self, "num_points", "patch_size", "num_steps", "batch_size", "lr", "base_channels", "hidden",
                 "num_samples", "sampling_steps", "max_grad_norm")
        groups = _unet_groups()
        if self.dataset not in TWO_D_DATASETS and self.base_channels % groups:
            raise ConfigError(f"config key 'base_channels' must be a multiple of {groups} (the U-Net's GroupNorm "
                              f"groups), got {self.base_channels}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"config key 'ema_decay' must be in [0, 1), got {self.ema_decay!r}")
        check_checkpoint_every(self.checkpoint_every)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"config key 'limit' must be >= 1, or None (omit the key) for all images, "
                              f"got {self.limit}")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ConfigError(f"config key 'channel_mults' must be positive integers, got {short(self.channel_mults)}")
        side = {"digits": 8, "mnist5k": 28, "photo-patches": self.patch_size}.get(self.dataset)
        divisor = 2 ** (len(self.channel_mults) - 1)  # each level after the first halves H and W
        if side is not None and side % divisor:
            raise ConfigError(f"config key 'channel_mults' has {len(self.channel_mults)} levels, which need images "
                              f"of a size divisible by {divisor}; {self.dataset} images are {side}×{side}")

    def memory_estimate(self) -> dict[str, int]:
        """Bytes of the dominant allocations, a rough lower bound (:mod:`~implicit_diffusion.runtime.memory`):
        the drawn points or patches; a minibatch's first feature map (base_channels × H × W per image, or
        the MLP's hidden layers per point) and its gradient; the loss of every step (float32); the
        samples drawn at the end. File data sets, of unknown size, count only the loss record."""
        b = 8 if self.dtype == "float64" else 4
        size = {"digits": (1, 8, 8, 1_797), "mnist5k": (1, 28, 28, self.limit or 5_000),
                "photo-patches": (3, self.patch_size, self.patch_size, self.num_points)}.get(self.dataset)
        if self.dataset in TWO_D_DATASETS:
            per_item, width, n_data = 2, 3 * self.hidden, self.num_points
        elif size is not None:
            per_item, width, n_data = size[0] * size[1] * size[2], self.base_channels * size[1] * size[2], size[3]
        else:
            per_item = width = n_data = 0
        batch = min(self.batch_size, n_data)
        drawn = n_data if self.dataset in TWO_D_DATASETS or self.dataset == "photo-patches" else 0
        return {f"num_points = {self.num_points:,} (the training data, {per_item} numbers each)": drawn * per_item * 4,
                f"batch_size = {self.batch_size:,} (a minibatch's first layer, {width:,} numbers per item, "
                f"and its gradient)": 2 * batch * (width + per_item) * b,
                f"num_steps = {self.num_steps:,} (the loss of every step)": 4 * self.num_steps,
                f"num_samples = {self.num_samples:,} (samples drawn at the end)": 2 * self.num_samples * per_item * b}


def load_training_data(config: Config, generator: torch.Generator) -> torch.Tensor:
    """The training set as ``(n, 2)`` points or ``(n, C, H, W)`` images in [−1, 1]."""
    from ..data import load_digits_images, load_image_data, load_mnist5k, load_photo_patches, two_d_dataset

    if config.dataset in TWO_D_DATASETS:
        return two_d_dataset(config.dataset, config.num_points, generator=generator)
    if config.dataset == "digits":
        return load_digits_images()
    if config.dataset == "mnist5k":  # 5,000 real 28×28 digits, sorted by class: shuffled before a limit
        images = load_mnist5k()
        if config.limit:
            images = images[torch.randperm(images.shape[0], generator=generator)][: config.limit]
        return images
    if config.dataset == "photo-patches":
        return load_photo_patches(config.num_points, config.patch_size, generator=generator)
    images = load_image_data(config.data, trust_pickle=config.trust_pickle, limit=config.limit or None)
    channels = {"mnist": 1, "cifar10": 3}.get(config.dataset)
    if channels is not None and images.shape[1] != channels:
        raise ConfigError(f"{config.data} holds {images.shape[1]}-channel images, but {config.dataset!r} has "
                          f"{channels}; use --set dataset=images for other data")
    return images


def build_model(config: Config, data: torch.Tensor) -> torch.nn.Module:
    """A :class:`ScoreMLP` for points, a :class:`UNet` for images (ε-prediction)."""
    from ..models.score_nets import ScoreMLP
    from ..models.unet import UNet

    if data.ndim == 2:
        return ScoreMLP(data.shape[1], hidden=config.hidden, depth=3)
    divisor = 2 ** (len(config.channel_mults) - 1)
    if data.shape[2] % divisor or data.shape[3] % divisor:
        raise ConfigError(f"images of size {tuple(data.shape[2:])} need sizes divisible by {divisor} for "
                          f"channel_mults={config.channel_mults}; use fewer levels")
    return UNet(in_channels=data.shape[1], base_channels=config.base_channels,
                channel_mults=tuple(config.channel_mults))


@dataclass
class Result:
    config: Config
    model: torch.nn.Module  # the EMA model
    schedule: VPSchedule
    losses: np.ndarray
    data_sample: torch.Tensor
    samples: torch.Tensor
    num_params: int
    wall_time: float

    def summary(self) -> dict:
        tail = max(1, len(self.losses) // 10)
        return {"dataset": self.config.dataset, "num_params": self.num_params,
                "loss_first_10%": float(self.losses[:tail].mean()), "loss_last_10%": float(self.losses[-tail:].mean()),
                "data_shape": list(self.data_sample.shape[1:]), "wall_time_s": self.wall_time}


class _LossLog:
    """Callback ``(step, loss)``: loss records to the sink in blocks of 500 (and the last step);
    ``flush`` sends a partial block (at a checkpoint, or when the run stops early)."""

    def __init__(self, sink: Callable[[list[dict]], None], num_steps: int):
        self.sink, self.num_steps = sink, num_steps
        self.block: list[dict] = []

    def __call__(self, k: int, loss: float) -> None:
        self.block.append({"step": k, "loss": loss})
        if len(self.block) == 500 or k == self.num_steps - 1:
            self.flush()

    def flush(self) -> None:
        if self.block:
            self.sink(list(self.block))
            self.block.clear()


_NO_PARTICLES = torch.empty(0)  # the loop callbacks' x: pretraining has no particles


def run(config: Config, *, metrics_sink=None, checkpoints: Checkpoints | None = None) -> Result:
    """Train, then sample from the EMA model; ``metrics_sink`` receives blocks of loss records.

    With ``checkpoints`` (see :mod:`~implicit_diffusion.runtime.checkpoints`), a checkpoint is written every
    ``config.checkpoint_every`` steps and on Ctrl-C, or the run continues from a saved one.
    """
    from ..samplers.diffusion import ddpm_step, sample
    from ..training.pretrain import DSMTrainer

    sink = metrics_sink or (lambda records: None)
    checkpoints = checkpoints or NoCheckpoints()
    device = resolve_device(config.device)
    precision = resolve_precision(config.dtype, device)
    with torch_threads(config.num_threads):
        # the data and θ₀ are drawn on the CPU, the same on every device; training draws on the device
        # (on the CPU, one generator for both: the stream of earlier releases)
        generator = generator_on(device, config.seed)
        data = load_training_data(config, generator if device.type == "cpu" else
                                  torch.Generator().manual_seed(config.seed))
        # a resume must train on the data the run trained on (a file changed since would go on silently)
        checkpoints.bind_data("training data", data, config.data or f"data set {config.dataset!r}")
        data = data.to(device=device, dtype=precision.dtype)
        schedule = VPSchedule(config.schedule, num_steps=config.sampling_steps)
        with torch.random.fork_rng(devices=[]):  # layer initialisation draws from the global RNG:
            torch.manual_seed(config.seed)  # seed it here, and leave the caller's state as it was
            model = build_model(config, data).to(device=device, dtype=precision.dtype)
        trainer = DSMTrainer(precision.wrap(model), data, schedule, num_steps=config.num_steps, generator=generator,
                             batch_size=min(config.batch_size, data.shape[0]), lr=config.lr,
                             ema_decay=config.ema_decay, max_grad_norm=config.max_grad_norm)
        log = _LossLog(sink, config.num_steps)
        first, before = 0, 0.0  # steps done and training seconds before this process (resume)
        if checkpoints.resumed:
            tensors, saved = checkpoints.state
            checkpoints.require(saved, trainer=dict, wall_time=float)
            record = checkpoints.require(saved["trainer"], "state.trainer", optimizer=dict, generator_device=str)
            first, before = checkpoints.start, saved["wall_time"]
            # DSMTrainer.state's tensors, as parts: checked against the live trainer, then loaded
            parts = {"trainer.model": trainer.model, "trainer.ema": trainer.ema,
                     "trainer.optimizer": trainer.optimizer, "trainer.generator": trainer.generator}
            checkpoints.restore(parts, {"trainer.optimizer": record["optimizer"],
                                        "trainer.generator": {"device": record["generator_device"]}},
                                num_steps=config.num_steps,
                                like={"trainer.losses": trainer.losses[:first].to("meta")})
            trainer.losses[:first] = tensors["trainer.losses"]
        start = time.perf_counter()

        def state(done: int, x: torch.Tensor) -> tuple[dict, dict]:
            log.flush()  # the metrics file then holds every step up to ``done``
            tensors, meta = trainer.state(done)
            return tensors, {"trainer": meta, "wall_time": before + time.perf_counter() - start}

        guard = DivergenceGuard(model.parameters(), f"a smaller lr (now {config.lr:g})")
        bar = ProgressBar(config.num_steps, f"pretrain {config.dataset}", enabled=config.progress, initial=first)
        # the guard first: a non-finite θ is neither logged nor checkpointed
        callbacks = [lambda k, _l: guard(k, _NO_PARTICLES, {}), log, lambda k, _l: bar(k, None, {})]
        save_checkpoint = checkpoints.callback(state)
        callbacks.append(lambda k, _l: save_checkpoint(k, _NO_PARTICLES, {}))  # last: it saves what was logged
        try:
            with checkpoints.catch_interrupts(), bar:
                info = trainer.run(first, callbacks)
        finally:  # a run stopped early still leaves every logged step in the metrics
            log.flush()
        wall = before + time.perf_counter() - start
        net = info.ema_model.module.eval()  # the EMA model (under autocast with bfloat16)
        ema = net.model if isinstance(net, Autocast) else net
        n = min(config.num_samples, data.shape[0]) if data.ndim == 4 else 2_000
        with torch.no_grad():
            x_init = torch.randn((n, *data.shape[1:]), generator=generator, device=device, dtype=data.dtype)
            samples = sample(ddpm_step, net, x_init, schedule=schedule, generator=generator, prediction=ema.prediction)
        idx = torch.randperm(data.shape[0], generator=generator, device=device)[:n]
    return Result(config, ema, schedule, info.losses.numpy(), data[idx].cpu(), samples.cpu(),
                  sum(p.numel() for p in ema.parameters()), wall)


def reproduce_command(config: Config) -> str:
    """The shell command that retrains this model (settings that differ from the defaults)."""
    changed = [f"--set {k}={_toml_value(v)}" for k, v in asdict(config).items()
               if k not in ("dataset", "data", "progress", "checkpoint_every", "device")
               and v != getattr(Config, k, v)]
    data = f" --data {config.data}" if config.data else ""
    return " ".join(["implicit-diffusion pretrain", config.dataset + data, *changed])


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, tuple):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def save(result: Result, run_dir) -> list[str]:
    """Write the EMA model, the loss curve, data-vs-samples figures and, last, summary.json;
    return the file names."""
    from ..models.io import save_score_model
    from ..plotting.diffusion import plot_image_grids, plot_loss_curve, plot_points
    from ..runtime.rundir import write_summary

    run_dir = Path(run_dir)
    extra = {"dataset": result.config.dataset, "data_shape": list(result.data_sample.shape[1:]),
             "reproduce": reproduce_command(result.config),
             "num_steps": result.config.num_steps, "seed": result.config.seed}
    save_score_model(run_dir / "model.safetensors", result.model, result.schedule, extra=extra)
    plot_loss_curve(run_dir / "loss.png", result.losses)
    if result.samples.ndim == 4:
        plot_image_grids(run_dir / "samples.png", [("training data", result.data_sample),
                                                    ("samples (EMA model)", result.samples)])
    else:
        plot_points(run_dir / "samples.png", [("training data", result.data_sample.numpy()),
                                              ("samples (EMA model)", result.samples.numpy())])
    write_summary(run_dir, result.summary())  # after the figures: it marks the run complete
    return ["model.safetensors", "loss.png", "samples.png", "summary.json"]


def table(result: Result) -> str:
    """The terminal summary: data, model size, DSM loss first → last 10% of steps, training time."""
    s = result.summary()
    rows = [("data", f"{s['dataset']} {tuple(s['data_shape'])}"),
            ("parameters", f"{s['num_params']:,}"),
            ("DSM loss, first → last 10% of steps", f"{s['loss_first_10%']:.4f} → {s['loss_last_10%']:.4f}"),
            ("training time", f"{s['wall_time_s']:.1f} s")]
    return key_values(rows)
