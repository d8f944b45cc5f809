"""A small CNN digit classifier: :class:`DigitClassifier`, saved as safetensors with a JSON description.

It reads images ``(B, 1, H, W)`` with pixels in [−1, 1] (the diffusion models' convention), ``H = W``
of 8 (scikit-learn's digits) or 28 (``mnist5k``), and returns logits ``(B, 10)``. It is a reward
for finetuning (``objectives.class_reward``), so it is built to be differentiated in ``x`` and to
give the same answer for an image whatever batch it is in: GroupNorm (never BatchNorm), no dropout.

Two trained classifiers are shipped beside the score models (``pretrained/``), each written by
``python -m implicit_diffusion.training.classifier --dataset NAME --out
src/implicit_diffusion/pretrained/NAME-classifier.safetensors --seed 0`` (recipe:
``training.classifier``; the exact command is in the file, ``extra["reproduce"]``):

============  ==================================  ============================================
name          file                                held-out accuracy (clean images, seed-0 split)
============  ==================================  ============================================
``digits``    ``digits-classifier.safetensors``   0.9916 (356/359), 8×8, 58,634 parameters
``mnist5k``   ``mnist5k-classifier.safetensors``  0.9890 (989/1,000), 28×28, 103,370 parameters
============  ==================================  ============================================

A file holds the ``state_dict`` and string metadata: ``format`` =
``"implicit-diffusion/classifier"``, ``version`` = ``"1"``, ``config`` (JSON of the constructor
arguments) and ``extra`` (JSON: data set, seed, held-out accuracy and split sizes, the command that
reproduces it in ``extra["reproduce"]``).

Example:
    >>> import torch
    >>> clf = load_classifier("digits")
    >>> clf(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DataError
from ..serialization import save_tensors

__all__ = ["CLASSIFIERS", "DigitClassifier", "classifier_path", "load_classifier", "save_classifier"]

FORMAT = "implicit-diffusion/classifier"
_VERSION = "1"
CLASSIFIERS = ("digits", "mnist5k")  # shipped: pretrained/{name}-classifier.safetensors
_SIZES = (8, 28)
# the shipped files live in pretrained/; found by path, since models/ may not import pretrained/
_SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pretrained"


class DigitClassifier(nn.Module):
    """Logits ``(B, 10)`` of an image ``(B, 1, H, W)`` in [−1, 1], ``H = W = image_size`` (8 or 28).

    Architecture: stages of ``conv3×3 → GroupNorm → SiLU``, the first at full resolution and each
    later one downsampling by 2 (stride 2), then flatten and one linear layer. ``channels`` are
    the widths of the stages; ``28×28`` inputs take one more stage (28 → 14 → 7 → 4) than ``8×8``
    ones (8 → 4 → 2) by default: 58,634 parameters at 8×8, 103,370 at 28×28 (0.24 and 0.41 MB in float32).

    >>> DigitClassifier(8)(torch.zeros(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """

    def __init__(self, image_size: int = 8, channels: tuple[int, ...] | list[int] | None = None,
                 num_classes: int = 10, groups: int = 8) -> None:
        super().__init__()
        if image_size not in _SIZES:
            raise ValueError(f"image_size must be one of {', '.join(map(str, _SIZES))}, got {image_size}")
        if channels is None:
            channels = (32, 64, 64) if image_size == 8 else (32, 64, 64, 64)
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 1 or c % groups for c in channels):
            raise ValueError(f"channels must be non-empty multiples of groups={groups}, got {channels}")
        self.config = {"image_size": image_size, "channels": list(channels), "num_classes": num_classes,
                       "groups": groups}
        self.image_size = image_size
        self.extra: dict[str, Any] = {}  # the file's metadata, set by load_classifier
        layers: list[nn.Module] = []
        side, width = image_size, 1
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(width, c, 3, stride=stride, padding=1), nn.GroupNorm(groups, c), nn.SiLU()]
            side, width = (side + 2 - 3) // stride + 1, c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width * side * side, num_classes)

    @property
    def data_shape(self) -> tuple[int, int, int]:
        """The image shape the classifier reads, ``(1, H, W)``."""
        return (1, self.image_size, self.image_size)

    def forward(self, x: Tensor) -> Tensor:
        check_image_shape(x, self.data_shape, what="the classifier")
        return self.head(self.features(x).flatten(1))


def check_image_shape(x: Tensor, shape: tuple[int, ...], *, what: str) -> None:
    """ValueError naming both shapes unless ``x`` is ``(B, *shape)``."""
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{what} reads images (B, {', '.join(map(str, shape))}), got shape {tuple(x.shape)}; "
                         f"resample the images or use a classifier trained at their size")


def classifier_path(name: str) -> Path:
    """Path of the shipped classifier ``name`` (``"digits"`` or ``"mnist5k"``)."""
    if name not in CLASSIFIERS:
        raise DataError(f"no shipped classifier {name!r}; available: {', '.join(CLASSIFIERS)}")
    path = _SHIPPED_DIR / f"{name}-classifier.safetensors"
    if not path.is_file():
        raise DataError(f"the shipped classifier file {path} is missing from this installation; recreate it with: "
                        f"python -m implicit_diffusion.training.classifier --dataset {name} --out {path} --seed 0")
    return path


def save_classifier(path: str | Path, model: DigitClassifier, *, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and config, with ``metadata`` as the JSON ``extra``, atomically."""
    if not isinstance(model, DigitClassifier):
        raise TypeError(f"can save DigitClassifier models only, got {type(model).__name__}")
    meta = {"format": FORMAT, "version": _VERSION, "config": json.dumps(model.config),
            "extra": json.dumps(metadata or {})}
    save_tensors(path, model.state_dict(), meta)


def load_classifier(path_or_name: str | Path, *, device: str | torch.device = "cpu") -> DigitClassifier:
    """The classifier saved at a path, or a shipped one by name (:data:`CLASSIFIERS`), in eval mode.

    Its metadata is in ``model.extra`` (a dict). Raises :class:`~implicit_diffusion.errors.DataError`
    (one line) for an unknown name (naming the available ones), a missing path, or a file that is not
    a classifier written by :func:`save_classifier`.
    """
    from safetensors import SafetensorError, safe_open

    source = str(path_or_name)
    if source in CLASSIFIERS and not Path(source).exists():
        path = classifier_path(source)
    else:
        path = Path(path_or_name)
        if not path.is_file():
            raise DataError(f"no such classifier file: {source!r} (a file written by save_classifier, "
                            f"or a shipped classifier's name: {', '.join(CLASSIFIERS)})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise DataError(f"{path} is not an implicit-diffusion classifier (metadata format="
                                f"{meta.get('format')!r})")
            if meta.get("version") != _VERSION:
                raise DataError(f"{path}: unsupported classifier file version {meta.get('version')!r}; "
                                f"allowed: {_VERSION}")
            config, extra = (_json(meta, key, path) for key in ("config", "extra"))
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DataError(f"{path} is not a readable safetensors file ({e})") from e
    if not isinstance(config, dict) or not isinstance(extra, dict):
        raise DataError(f"{path}: metadata 'config' and 'extra' must be JSON objects")
    try:
        with torch.device("meta"):  # shapes only: a hostile config allocates nothing
            expected = {k: tuple(v.shape) for k, v in DigitClassifier(**config).state_dict().items()}
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: malformed classifier description ({e})") from None
    held = {k: tuple(v.shape) for k, v in state.items()}
    if expected != held:
        raise DataError(f"{path}: weights do not match the DigitClassifier it describes ("
                        f"{sum(map(math.prod, expected.values())):,} parameters expected in {len(expected)} "
                        f"tensors, the file holds {sum(map(math.prod, held.values())):,} in {len(held)})")
    model = DigitClassifier(**config)
    model.load_state_dict(state, strict=True)
    model.extra = extra
    return model.to(device).eval()


def _json(meta: dict, key: str, path: Path) -> Any:
    if key not in meta:
        raise DataError(f"{path}: malformed classifier description (metadata key {key!r} is missing)")
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: metadata {key!r} is not valid JSON ({e})") from None
