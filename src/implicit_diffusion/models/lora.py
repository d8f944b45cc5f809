"""LoRA: low-rank adapters on the weights of a network's Linear and Conv2d layers (Hu et al. 2022).

Each adapted layer's weight becomes

    W' = W + (α/r)·B A,      B ``(out, r)`` zero-initialised,  A ``(r, fan_in)`` Kaiming-uniform,

with the base weight W frozen and only A and B trained: Linear ``W (out, in)``, ``fan_in = in``;
Conv2d ``W (out, in/groups, kh, kw)``, ``fan_in = in·kh·kw/groups``, and B A ``(out, fan_in)`` reshaped
to W's shape (any layer with a weight of ≥ 2 dimensions, the first being the output, works the same
way). Since B = 0 at the start, the adapted network computes exactly what the base network did.

It is PyTorch's own machinery, :func:`torch.nn.utils.parametrize.register_parametrization` on each
layer's ``weight``, so the adapted network is still the same ``nn.Module`` (a project ``UNet`` or a
diffusers ``UNet2DModel`` alike): ``copy.deepcopy``, ``torch.func.functional_call`` (the frozen θ₀ of
:class:`~implicit_diffusion.objectives.GirsanovKL`), ``.to(device, dtype)`` and ``state_dict`` /
``load_state_dict`` (the algorithms' checkpoints) work unchanged. Its ``state_dict`` names the base
weight ``<layer>.parametrizations.weight.original`` and the adapters
``<layer>.parametrizations.weight.0.lora_A`` / ``.lora_B``; :func:`merge_lora` folds the adapters
into the weights and gives back the original names. So take any snapshot of the weights that is
swapped back in later (θ₀ of ``GirsanovKL`` / ``path_kl_cost``, a ``state_dict`` to reload) *after*
``add_lora``: PyTorch refuses to assign ``<layer>.weight`` of an adapted layer (``RuntimeError``:
the parametrization has no ``right_inverse``, there being no unique split of a weight into W and
B A). Pickling a module with adapters is refused by PyTorch too (save tensors: :func:`lora_state_dict`,
or the merged ``state_dict``). For repeated no-grad forwards (sampling), ``with
torch.nn.utils.parametrize.cached():`` computes each W' once.

Reference: Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang & Chen, "LoRA: Low-Rank Adaptation of Large
Language Models", ICLR 2022 (B = 0, A random, scale α/r: their §4.1).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 4))
    >>> params = add_lora(net, 2, generator=torch.Generator().manual_seed(0))
    >>> sum(p.numel() for p in params)  # r·(in + out) per Linear: 2·(8 + 16) + 2·(16 + 4)
    88
    >>> optimizer = torch.optim.Adam(params, lr=1e-3)  # the base weights are frozen
    >>> sorted(merge_lora(net).state_dict())
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = ["add_lora", "has_lora", "load_lora_state_dict", "lora_parameters", "lora_state_dict", "merge_lora"]

# add_lora records each parameter's requires_grad here (on the module it adapted), merge_lora restores it
_REQUIRES_GRAD = "_lora_base_requires_grad"


class _LoRA(nn.Module):
    """The parametrization W ↦ W + scale·(B A).reshape(W.shape); its parameters are A and B."""

    def __init__(self, weight: Tensor, rank: int, scale: float, generator: torch.Generator):
        super().__init__()
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        # drawn on the generator's device, then moved: the same A for a CPU generator whatever the model's device
        a = torch.empty((rank, fan_in), dtype=weight.dtype, device=generator.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # U(±1/√fan_in), as nn.Linear's weight
        self.lora_A = nn.Parameter(a.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros((fan_out, rank), dtype=weight.dtype, device=weight.device))
        self.rank = rank
        self.scale = scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).reshape(weight.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def _check_rank(rank) -> int:
    # bool is an int subclass: True as a rank is a mistake, not 1
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    return int(rank)


def _lora_layers(module: nn.Module) -> list[tuple[str, _LoRA]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _LoRA)]


def has_lora(module: nn.Module) -> bool:
    """Whether any layer of ``module`` carries a LoRA adapter (from :func:`add_lora`, not yet merged)."""
    return bool(_lora_layers(module))


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (every A and B) of ``module``, in module order: what the optimizer takes."""
    return [p for _, m in _lora_layers(module) for p in (m.lora_A, m.lora_B)]


def add_lora(module: nn.Module, rank: int, *, alpha: float | None = None, generator: torch.Generator,
             targets: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)) -> list[nn.Parameter]:
    """Adapt ``module`` in place: freeze every parameter, add W' = W + (α/r)·B A to every targeted layer.

    Args:
        module: any network, e.g. :class:`~implicit_diffusion.models.UNet` or a diffusers ``UNet2DModel``.
        rank: r, an integer ≥ 1. A layer whose ``min(out, fan_in)`` is smaller gets that rank instead (a
            rank-r update of it would be no more general), with the same scale α/r as every other layer;
            e.g. a U-Net's last conv to 1 channel gets rank 1.
        alpha: α > 0; default r (scale 1). The scale is not part of :func:`lora_state_dict`: load adapters
            into a module adapted with the same rank and α.
        generator: draws every A (B starts at 0); the A's are the same for the same generator state.
        targets: the layer types to adapt; only those with a ``weight`` tensor of ≥ 2 dimensions are.

    Returns:
        The adapters' parameters (:func:`lora_parameters`), the only ones with ``requires_grad``: give them
        to the optimizer. Every base parameter, targeted or not (biases, norms), now has ``requires_grad``
        False; the previous flags are recorded on ``module`` and restored by :func:`merge_lora`.

    A module that already has adapters, or a targeted weight that is already parametrized, is a
    ``ValueError`` (merge first); so is a module with no targeted layer.
    """
    rank = _check_rank(rank)
    alpha = rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    targets = tuple(targets)
    if not targets or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in targets):
        raise ValueError(f"targets must be a non-empty tuple of nn.Module subclasses, got {targets!r}")
    if has_lora(module):
        raise ValueError(f"{type(module).__name__} already has LoRA adapters: merge_lora it first, or load "
                         f"saved adapters into it with load_lora_state_dict")
    layers = [(name, m) for name, m in module.named_modules()
              if isinstance(m, targets) and isinstance(getattr(m, "weight", None), Tensor) and m.weight.ndim >= 2]
    if not layers:
        found = sorted({type(m).__name__ for m in module.modules()})
        raise ValueError(f"no layer to adapt in {type(module).__name__}: none of its modules is a "
                         f"{' or '.join(t.__name__ for t in targets)} with a weight of >= 2 dimensions "
                         f"(found: {', '.join(found)})")
    for name, m in layers:
        if parametrize.is_parametrized(m, "weight"):
            raise ValueError(f"the weight of layer {name!r} is already parametrized (e.g. by weight_norm); "
                             f"LoRA needs a plain weight")
    object.__setattr__(module, _REQUIRES_GRAD, {n: p.requires_grad for n, p in module.named_parameters()})
    module.requires_grad_(False)
    scale = alpha / rank
    for _, m in layers:
        layer_rank = min(rank, m.weight.shape[0], m.weight[0].numel())
        parametrize.register_parametrization(m, "weight", _LoRA(m.weight.detach(), layer_rank, scale, generator))
    return lora_parameters(module)


def _own_class(layer: nn.Module) -> None:
    """Give ``layer`` a class of its own, equal to its parametrized class.

    ``copy.deepcopy`` gives the copy the very class register_parametrization made for the original, and
    remove_parametrizations deletes the ``weight`` property from that class: merging a copy would break
    the original (and the reverse) without this."""
    cls = type(layer)
    body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    layer.__class__ = type(cls.__name__, cls.__bases__, body)


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold the adapters into the weights, W ← W + (α/r)·B A, in place; return ``module``.

    Afterwards ``module`` has no LoRA and no parametrization of its own left: its classes, parameter
    names and ``state_dict`` keys are those of the un-adapted architecture, so ``load_state_dict`` into a
    fresh model (or ``save_score_model`` / ``save_diffusers``) works. ``requires_grad`` of every parameter
    is restored to what it was before :func:`add_lora` (when merging the module add_lora was called on;
    merged from elsewhere, the base parameters stay frozen). To keep the adapted model, merge a copy:
    ``merge_lora(copy.deepcopy(model))``. A module without adapters is a ``ValueError``.
    """
    layers = [m for m in module.modules() if parametrize.is_parametrized(m, "weight")
              and any(isinstance(p, _LoRA) for p in m.parametrizations.weight)]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no LoRA adapters to merge")
    for m in layers:  # collected first: removing changes the module tree
        _own_class(m)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    recorded = module.__dict__.pop(_REQUIRES_GRAD, {})
    for name, p in module.named_parameters():
        if name in recorded:
            p.requires_grad_(recorded[name])
    return module


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The adapters only, by their ``state_dict`` names (``<layer>.parametrizations.weight.0.lora_A`` /
    ``lora_B``), detached copies: e.g. ``safetensors.torch.save_file(lora_state_dict(model), path)``."""
    state = {f"{name}.{k}": p.detach().clone() for name, m in _lora_layers(module)
             for k, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B))}
    if not state:
        raise ValueError(f"{type(module).__name__} has no LoRA adapters (add_lora first)")
    return state


def load_lora_state_dict(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy the adapters of :func:`lora_state_dict` into ``module``, adapted by :func:`add_lora` with the
    same targets, rank and α. A missing, unexpected or misshapen entry is a ``ValueError`` (nothing is
    copied then); values are cast to each adapter's dtype and device."""
    own = {f"{name}.{k}": p for name, m in _lora_layers(module)
           for k, p in (("lora_A", m.lora_A), ("lora_B", m.lora_B))}
    if not own:
        raise ValueError(f"{type(module).__name__} has no LoRA adapters to load into (add_lora first)")
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"the LoRA state does not fit {type(module).__name__}'s adapters: "
                         f"missing {missing[:3]}{' …' if len(missing) > 3 else ''} ({len(missing)}), "
                         f"unexpected {unexpected[:3]}{' …' if len(unexpected) > 3 else ''} ({len(unexpected)})")
    for key, p in own.items():
        if tuple(state[key].shape) != tuple(p.shape):
            raise ValueError(f"LoRA entry {key!r} has shape {tuple(state[key].shape)}, the adapter {tuple(p.shape)} "
                             f"(a different rank?)")
    with torch.no_grad():
        for key, p in own.items():
            p.copy_(state[key])
