"""The class reward ``class:C``: R(x) = log p(C | x) under a frozen digit classifier ("make every sample a 3").

Images are ``(B, 1, H, W)`` with pixels in [−1, 1]; the reward is ``(B,)``, at most 0, and
differentiable in the pixels. As the other image rewards (``objectives.image_rewards``) it reads
the image as displayed, clip(x, −1, 1): pushing a pixel off the scale earns nothing.

Spec strings (:func:`parse_class_reward`), for a configuration's ``reward`` setting:

- ``"class:C"``, C in 0..9: the shipped classifier for the model's image size —
  8×8 → ``"digits"``, 28×28 → ``"mnist5k"`` (:data:`CLASSIFIER_FOR_SIZE`);
- ``"class:C@NAME"``: the classifier ``NAME`` — a shipped name (``digits``, ``mnist5k``) or a
  file written by :func:`~implicit_diffusion.models.classifier.save_classifier`; its image size must
  be the model's.

Example:
    >>> import torch
    >>> reward = parse_class_reward("class:3", (1, 8, 8))
    >>> reward(torch.zeros(4, 1, 8, 8)).shape
    torch.Size([4])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.classifier import check_image_shape, load_classifier

__all__ = ["CLASSIFIER_FOR_SIZE", "ClassReward", "fraction_classified_as", "is_class_reward", "parse_class_reward"]

PREFIX = "class:"
CLASSIFIER_FOR_SIZE = {(1, 8, 8): "digits", (1, 28, 28): "mnist5k"}  # the shipped classifier per image shape
_NUM_CLASSES = 10


def _check_target(target: object) -> int:
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < _NUM_CLASSES:
        raise ValueError(f"the target class must be an integer in 0..{_NUM_CLASSES - 1}, got {target!r}")
    return target


def _data_shape(classifier: nn.Module) -> tuple[int, ...] | None:
    shape = getattr(classifier, "data_shape", None)
    return tuple(shape) if shape is not None else None


class ClassReward:
    """R(x) = log softmax(f(clip(x, −1, 1)))_C: the log-probability of class ``target`` under ``classifier``.

    Args:
        classifier: maps ``(B, 1, H, W)`` to logits ``(B, 10)``; frozen here (``requires_grad_(False)``,
            eval mode), so finetuning never moves it; moved to the images' device at the first call
            on another device. A :class:`~implicit_diffusion.models.classifier.DigitClassifier` also
            fixes the image shape, checked at each call (ValueError naming both shapes).
        target: C in 0..9 (ValueError otherwise).

    Call: ``(B, 1, H, W)`` → ``(B,)``, in the images' dtype (the classifier runs in its own).

    >>> from implicit_diffusion.models.classifier import load_classifier
    >>> r = ClassReward(load_classifier("digits"), 3)
    >>> bool((r(torch.zeros(2, 1, 8, 8)) <= 0).all())
    True
    """

    def __init__(self, classifier: nn.Module, target: int) -> None:
        self.target = _check_target(target)
        self.classifier = classifier.eval().requires_grad_(False)
        self.data_shape = _data_shape(classifier)
        self.__name__ = f"class:{self.target}"

    def log_probs(self, x: Tensor) -> Tensor:
        """log p(· | x), ``(B, 10)``, in the images' dtype; differentiable in ``x``."""
        if self.data_shape is not None:
            check_image_shape(x, self.data_shape, what=f"the {self.__name__} reward")
        param = next(self.classifier.parameters(), None)
        if param is not None and param.device != x.device:
            self.classifier.to(x.device)
            param = next(self.classifier.parameters())
        dtype = param.dtype if param is not None else x.dtype
        logits = self.classifier(x.clamp(-1.0, 1.0).to(dtype))
        return torch.log_softmax(logits.to(x.dtype), dim=-1)

    def __call__(self, x: Tensor) -> Tensor:
        return self.log_probs(x)[:, self.target]

    def __repr__(self) -> str:
        return f"ClassReward(target={self.target}, data_shape={self.data_shape})"


@torch.no_grad()
def fraction_classified_as(classifier: nn.Module | ClassReward, x: Tensor, target: int) -> float:
    """The fraction of the images ``x`` ``(B, 1, H, W)`` whose most probable class is ``target``
    (clipped to [−1, 1] first, as the reward reads them).

    >>> from implicit_diffusion.models.classifier import load_classifier
    >>> fraction_classified_as(load_classifier("digits"), -torch.ones(3, 1, 8, 8), 3) in (0.0, 1.0)
    True
    """
    reward = classifier if isinstance(classifier, ClassReward) else ClassReward(classifier, target)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"fraction_classified_as needs a non-empty batch of images, got shape {tuple(x.shape)}")
    return float((reward.log_probs(x).argmax(dim=-1) == _check_target(target)).to(torch.float64).mean())


def is_class_reward(spec: str) -> bool:
    """Whether ``spec`` names a class reward (starts with ``"class:"``)."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_class_reward(spec: str, data_shape: tuple[int, ...] | list[int], *,
                       device: str | torch.device = "cpu") -> ClassReward:
    """The :class:`ClassReward` of ``spec`` (``"class:C"`` or ``"class:C@NAME"``, module docstring) for
    images of shape ``data_shape`` ``(1, H, W)``.

    Raises :class:`~implicit_diffusion.errors.ConfigError` (a ValueError) naming the bad part: a
    malformed spec, C outside 0..9, no shipped classifier for ``data_shape``, or a classifier of
    another image size; :class:`~implicit_diffusion.errors.DataError` for an unknown classifier.

    >>> parse_class_reward("class:7@mnist5k", (1, 28, 28))
    ClassReward(target=7, data_shape=(1, 28, 28))
    """
    if not is_class_reward(spec):
        raise ConfigError(f"not a class reward: {spec!r}; expected 'class:C' or 'class:C@CLASSIFIER', C in 0..9")
    target_text, at, name = spec[len(PREFIX):].partition("@")
    if len(target_text) != 1 or target_text not in "0123456789":  # not isdigit(): it accepts '³', '٣'
        raise ConfigError(f"reward {spec!r}: the class must be one digit 0..9, got {target_text!r}")
    if at and not name:
        raise ConfigError(f"reward {spec!r}: no classifier after '@'; expected 'class:C@NAME', NAME a shipped "
                          f"classifier ({', '.join(CLASSIFIER_FOR_SIZE.values())}) or a classifier file")
    shape = tuple(int(d) for d in data_shape)
    if not name:
        if shape not in CLASSIFIER_FOR_SIZE:
            known = ", ".join(f"{'×'.join(map(str, s[1:]))} ({n})" for s, n in CLASSIFIER_FOR_SIZE.items())
            raise ConfigError(f"reward {spec!r}: no shipped classifier for images of shape {shape}; shipped: "
                              f"{known} (one channel); name a classifier file with 'class:C@PATH'")
        name = CLASSIFIER_FOR_SIZE[shape]
    classifier = load_classifier(name, device=device)
    if _data_shape(classifier) != shape:
        raise ConfigError(f"reward {spec!r}: the classifier {name!r} reads images of shape "
                          f"{_data_shape(classifier)}, the model makes {shape}")
    return ClassReward(classifier, int(target_text))
