"""Checks of a diffusers directory's JSON and weights before diffusers builds anything from them.

diffusers trusts its config files: a string where a number belongs, ``num_train_timesteps = 0``, a
negative β, an unknown ``beta_schedule`` or ``sample_size = 100000`` end in a traceback deep inside it
(or in an 80 GB allocation later, when images of that size are sampled). Here each key that
:func:`~implicit_diffusion.models.diffusers_adapter.load_diffusers` relies on is checked for its
JSON type and range, and the ``UNet2DModel`` the config describes is built on PyTorch's ``meta``
device (shapes, no memory) and its parameter count compared with the tensors in the safetensors
weights (read from their headers alone). Every failure is one :class:`DataError` line naming the
file, the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import DataError

__all__ = ["MAX_SAMPLE_SIZE", "check_scheduler_config", "check_unet_config", "check_unet_weights", "read_json"]

MAX_SAMPLE_SIZE = 2048  # pixels per side: a 3×2048×2048 image is 50 MB in float32, per sampler state
MAX_CHANNELS = 8192  # per block (the largest released UNet2DModels use ≤ 1,024)
MAX_IN_CHANNELS = 64  # image (3) or latent (4) channels
MAX_LEVELS = 8
MAX_TRAIN_TIMESTEPS = 100_000
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D", "ResnetDownsampleBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "ResnetUpsampleBlock2D")
BETA_SCHEDULES = {"DDPMScheduler": ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid"),
                  "DDIMScheduler": ("linear", "scaled_linear", "squaredcos_cap_v2")}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_json(file: Path) -> dict:
    """The JSON object in ``file``; a one-line DataError if it is not valid JSON or not an object."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise DataError(f"{str(file)!r} is not valid JSON: {e}") from None
    except OSError as e:
        raise DataError(f"cannot read {str(file)!r}: {e}") from None
    if not isinstance(value, dict):
        raise DataError(f"{str(file)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    """``check(key, ok, allowed)`` over one config dict, raising with the file, key and value."""

    def __init__(self, file: Path, config: dict):
        self.file, self.config = file, config

    def __call__(self, key: str, ok, allowed: str, default: Any = None) -> Any:
        if key not in self.config:
            return default
        value = self.config[key]
        if not ok(value):
            raise DataError(f"{str(self.file)!r}: {key} = {_short(value)} is not allowed; expected {allowed}")
        return value

    def int_in(self, key: str, lo: int, hi: int, default: Any = None, *, none: bool = False) -> Any:
        return self(key, lambda v: (none and v is None) or (_is_int(v) and lo <= v <= hi),
                    f"an integer in {lo}..{hi}" + (" or null" if none else ""), default)

    def choice(self, key: str, allowed: tuple, default: Any = None) -> Any:
        return self(key, lambda v: isinstance(v, str) and v in allowed,
                    f"one of {', '.join(map(str, allowed))}", default)

    def flag(self, key: str) -> Any:
        return self(key, lambda v: isinstance(v, bool), "true or false")

    def number(self, key: str, ok, allowed: str) -> Any:
        return self(key, lambda v: _is_number(v) and ok(v), allowed)


def check_unet_config(config: dict, file: Path) -> tuple[int, int, int]:
    """Check a ``UNet2DModel`` ``config.json``; return the sample shape (C, H, W) it describes."""
    name = config.get("_class_name")
    if name != "UNet2DModel":
        raise DataError(f"{str(file)!r} is not a diffusers UNet2DModel config (_class_name = {_short(name)}); "
                        "expected the config.json written by UNet2DModel.save_pretrained")
    c = _Checker(file, config)
    size = c("sample_size", lambda v: (_is_int(v) and 1 <= v <= MAX_SAMPLE_SIZE) or (
        isinstance(v, list) and len(v) == 2 and all(_is_int(s) and 1 <= s <= MAX_SAMPLE_SIZE for s in v)),
        f"an integer (or [height, width]) in 1..{MAX_SAMPLE_SIZE}")
    if size is None:
        raise DataError(f"{str(file)!r}: sample_size is missing (or null); expected the image side in "
                        f"1..{MAX_SAMPLE_SIZE}")
    h, w = (size, size) if _is_int(size) else size
    channels = c.int_in("in_channels", 1, MAX_IN_CHANNELS, 3)
    out = c.int_in("out_channels", 1, MAX_IN_CHANNELS, 3)
    if out != channels:
        raise DataError(f"{str(file)!r}: out_channels = {out} differs from in_channels = {channels}; a score model "
                        "predicts noise (or x₀) of its input's shape")
    down = c("down_block_types", lambda v: isinstance(v, list) and 1 <= len(v) <= MAX_LEVELS
             and all(b in DOWN_BLOCKS for b in v), f"a list of 1 to {MAX_LEVELS} of {', '.join(DOWN_BLOCKS)}",
             ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"])
    up = c("up_block_types", lambda v: isinstance(v, list) and all(b in UP_BLOCKS for b in v),
           f"a list of {', '.join(UP_BLOCKS)}", ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
    widths = c("block_out_channels", lambda v: isinstance(v, list) and v and all(
        _is_int(x) and 1 <= x <= MAX_CHANNELS for x in v), f"a list of integers in 1..{MAX_CHANNELS}",
        [224, 448, 672, 896])
    if not len(down) == len(up) == len(widths):
        raise DataError(f"{str(file)!r}: down_block_types, up_block_types and block_out_channels have "
                        f"{len(down)}, {len(up)} and {len(widths)} entries; expected the same number")
    c.int_in("layers_per_block", 1, 16)
    groups = c.int_in("norm_num_groups", 1, MAX_CHANNELS, 32)
    if any(width % groups for width in widths):
        raise DataError(f"{str(file)!r}: norm_num_groups = {groups} does not divide block_out_channels = {widths}")
    attn_groups = c.int_in("attn_norm_num_groups", 1, MAX_CHANNELS, none=True)
    if attn_groups and any(width % attn_groups for width in widths):
        raise DataError(f"{str(file)!r}: attn_norm_num_groups = {attn_groups} does not divide "
                        f"block_out_channels = {widths}")
    c.int_in("attention_head_dim", 1, MAX_CHANNELS, none=True)
    if config.get("mid_block_type") is not None:
        c.choice("mid_block_type", ("UNetMidBlock2D",))
    c.choice("time_embedding_type", ("positional", "fourier", "learned"))
    c.int_in("time_embedding_dim", 2, 16 * MAX_CHANNELS, none=True)
    c.int_in("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS, none=True)
    c.choice("act_fn", ("silu", "swish", "mish", "gelu", "relu"))
    c.choice("resnet_time_scale_shift", ("default", "scale_shift"))
    c.choice("downsample_type", ("conv", "resnet"))
    c.choice("upsample_type", ("conv", "resnet"))
    c.number("dropout", lambda v: 0 <= v < 1, "a number in [0, 1)")
    c.number("norm_eps", lambda v: 0 < v < 1, "a number in (0, 1)")
    c.number("freq_shift", lambda v: abs(v) < 1e6, "a finite number")
    c.number("mid_block_scale_factor", lambda v: v != 0, "a non-zero number")
    c.int_in("downsample_padding", 0, 16)
    for key in ("center_input_sample", "flip_sin_to_cos", "add_attention"):
        c.flag(key)
    for key in ("class_embed_type", "num_class_embeds"):
        if config.get(key) is not None:
            raise DataError(f"{str(file)!r}: {key} = {_short(config[key])}: class-conditional UNets are not "
                            "supported (the sampler has no class labels); expected null")
    divisor = 2 ** (len(widths) - 1)
    if h % divisor or w % divisor:
        raise DataError(f"{str(file)!r}: sample_size = {_short(size)} is not divisible by {divisor} "
                        f"(= 2**(len(block_out_channels) - 1)), so the U-Net's skips would not line up")
    return channels, h, w


def check_scheduler_config(config: dict, file: Path, allowed_classes: tuple[str, ...],
                           predictions: tuple[str, ...]) -> str:
    """Check a DDPM/DDIM ``scheduler_config.json``; return its class name."""
    name = config.get("_class_name")
    if name not in allowed_classes:
        raise DataError(f"scheduler {name!r} in {str(file)!r} is not supported; allowed: {', '.join(allowed_classes)}")
    c = _Checker(file, config)
    prediction = config.get("prediction_type", "epsilon")
    if not (isinstance(prediction, str) and prediction in predictions):
        raise DataError(f"prediction_type {_short(prediction)} is not supported (in {str(file)!r}); "
                        f"allowed: {', '.join(predictions)}")
    n = c.int_in("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS, 1000)
    betas = c("trained_betas", lambda v: v is None or (isinstance(v, list) and 1 <= len(v) <= MAX_TRAIN_TIMESTEPS
                                                       and all(_is_number(b) and 0 < b < 1 for b in v)),
              f"null or a list of 1 to {MAX_TRAIN_TIMESTEPS} numbers in (0, 1)")
    if betas is None:
        c.choice("beta_schedule", BETA_SCHEDULES[name])
        for key in ("beta_start", "beta_end"):
            c.number(key, lambda v: 0 < v < 1, "a number in (0, 1) (a noise variance per step)")
    c.choice("timestep_spacing", ("leading", "trailing", "linspace"))
    c.int_in("steps_offset", 0, max(0, n - 1))
    for key in ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr"):
        c.flag(key)
    for key in ("clip_sample_range", "sample_max_value", "dynamic_thresholding_ratio"):
        c.number(key, lambda v: v > 0, "a positive number")
    c("variance_type", lambda v: v is None or isinstance(v, str), "a string")
    return name


def check_unet_weights(config: dict, unet_dir: Path) -> None:
    """The parameter count of the ``UNet2DModel`` that ``config`` describes (built on the meta device)
    against the tensors in ``unet_dir``'s safetensors weights (their headers only)."""
    import inspect

    import torch
    from diffusers import UNet2DModel
    from safetensors import SafetensorError, safe_open

    files = [unet_dir / WEIGHTS]
    index = unet_dir / f"{WEIGHTS}.index.json"
    if not files[0].is_file() and index.is_file():  # sharded weights
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v and "\\" not in v
                                                       for v in weight_map.values()):
            raise DataError(f"{str(index)!r}: weight_map must map tensor names to shard file names")
        files = [unet_dir / shard for shard in sorted(set(weight_map.values()))]
    if not all(f.is_file() for f in files):
        return  # diffusers' own message (no safetensors weights: only safetensors weights are read)
    held = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                held += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(f"{str(f)!r} is not a readable safetensors file ({e})") from None
    keys = set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
    try:
        with torch.device("meta"):
            skeleton = UNet2DModel(**{k: v for k, v in config.items() if k in keys})
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{str(unet_dir / 'config.json')!r} does not describe a buildable UNet2DModel: "
                        f"{' '.join(str(e).split())[:200]}") from None
    claimed = sum(v.numel() for v in skeleton.state_dict().values())
    if claimed != held:
        raise DataError(f"{str(unet_dir / 'config.json')!r} describes a UNet2DModel of {claimed:,} parameters "
                        f"({_size(4 * claimed)} in float32); its weights in {str(files[0].name)!r} hold {held:,}")


def _size(n: int) -> str:
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"
