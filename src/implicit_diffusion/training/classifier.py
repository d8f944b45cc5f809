"""Training the digit classifiers that the ``class:C`` reward reads (:func:`train_classifier`).

Recipe (the same for both data sets, everything drawn from one ``torch.Generator(seed)``):

- data: ``"digits"`` (scikit-learn's 1,797 8×8 digits) or ``"mnist5k"`` (5,000 28×28 MNIST digits),
  pixels in [−1, 1];
- split: stratified, :func:`heldout_split` — in each class a seeded permutation, the first
  ``round(0.2·n_c)`` held out (digits: 1,438 train / 359 held out; mnist5k: 4,000 / 1,000);
- augmentation (training batches only): a random shift of up to ±1 pixel (8×8) or ±2 (28×28),
  background filled with −1; then Gaussian noise of standard deviation σ ~ U(0, ``noise_max``) on a
  random half of the batch, clipped to [−1, 1] — a finetuned diffusion model's samples are imperfect
  and the reward must stay sensible (and smooth) on them;
- Adam, cosine-decayed learning rate, cross-entropy, a few epochs;
- the quoted accuracy is on the **clean** held-out images.

Command line (one CPU thread, so the file is the same bytes on every run on a machine)::

    python -m implicit_diffusion.training.classifier --dataset digits --out digits-classifier.safetensors --seed 0

prints the held-out accuracy and writes the classifier with its metadata
(:func:`~implicit_diffusion.models.classifier.save_classifier`); it takes about 10 s (digits) and
1 min (mnist5k) on one CPU core. The shipped files were written with ``--out
src/implicit_diffusion/pretrained/{digits,mnist5k}-classifier.safetensors``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.classifier import DigitClassifier, save_classifier

__all__ = ["ClassifierResult", "heldout_accuracy", "heldout_split", "load_labelled", "main", "train_classifier"]

Dataset = Literal["digits", "mnist5k"]
DATASETS = ("digits", "mnist5k")
_EPOCHS = {"digits": 40, "mnist5k": 15}
_SHIFT = {"digits": 1, "mnist5k": 2}
# the recipe's settings (train_classifier's defaults; recorded in each file's metadata)
_BATCH_SIZE, _LR, _NOISE_MAX, _HELDOUT_FRACTION = 64, 3e-3, 0.5, 0.2


def load_labelled(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """``(images, labels)``: float32 ``(N, 1, H, W)`` in [−1, 1] and int64 ``(N,)`` in 0..9."""
    if dataset == "digits":
        from ..data.builtin import load_digits_images, load_digits_labels

        return load_digits_images(), load_digits_labels()
    if dataset == "mnist5k":
        from ..data.mnist5k import load_mnist5k

        return load_mnist5k(labels=True)
    raise ValueError(f"unknown data set {dataset!r}; allowed: {', '.join(DATASETS)}")


def heldout_split(labels: Tensor, *, seed: int = 0, fraction: float = 0.2) -> tuple[Tensor, Tensor]:
    """Stratified split: ``(train_indices, heldout_indices)``, each sorted, int64.

    In each class c (``n_c`` images) a permutation drawn from ``torch.Generator().manual_seed(seed)``
    (classes in order 0..9) picks ``round(fraction·n_c)`` images to hold out.

    >>> train, held = heldout_split(torch.arange(10).repeat(5), seed=0)
    >>> len(train), len(held), sorted(torch.arange(10).repeat(5)[held].tolist())
    (40, 10, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    held = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        perm = members[torch.randperm(members.numel(), generator=generator)]
        held.append(perm[: round(fraction * members.numel())])
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    mask[torch.cat(held)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


@torch.no_grad()
def heldout_accuracy(model: torch.nn.Module, images: Tensor, labels: Tensor, *,
                     batch_size: int = 500) -> tuple[float, int]:
    """``(accuracy, number correct)`` of ``model``'s argmax on ``images`` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / images.shape[0], correct


def _augment(x: Tensor, *, shift: int, noise_max: float, generator: torch.Generator) -> Tensor:
    """Random shifts of up to ±``shift`` pixels (background −1), then noise σ ~ U(0, noise_max) on half."""
    b, _, h, w = x.shape
    if shift:
        dy, dx = (torch.randint(0, 2 * shift + 1, (b,), generator=generator) for _ in range(2))
        x = _crop(F.pad(x, (shift,) * 4, value=-1.0), dy, dx, h, w)
    if noise_max > 0:
        sigma = noise_max * torch.rand(b, generator=generator)
        sigma = sigma * (torch.rand(b, generator=generator) < 0.5)  # half the batch stays clean
        x = (x + sigma[:, None, None, None] * torch.randn(x.shape, generator=generator)).clamp(-1.0, 1.0)
    return x


def _crop(padded: Tensor, dy: Tensor, dx: Tensor, h: int, w: int) -> Tensor:
    """``padded[i, :, dy_i:dy_i+h, dx_i:dx_i+w]`` for each image i."""
    b = padded.shape[0]
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (b, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (b, 1, w)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


@dataclass(frozen=True)
class ClassifierResult:
    """What :func:`train_classifier` returns: the model (eval mode), its clean held-out accuracy, the split."""

    model: DigitClassifier
    heldout_accuracy: float
    heldout_correct: int
    num_train: int
    num_heldout: int
    losses: list[float]  # mean training loss per epoch
    seconds: float

    def metadata(self, dataset: str, seed: int, settings: dict, reproduce: str) -> dict:
        """The ``extra`` JSON a shipped classifier file carries."""
        return {"dataset": dataset, "seed": seed, "data_shape": list(self.model.data_shape),
                "heldout_accuracy": self.heldout_accuracy, "heldout_correct": self.heldout_correct,
                "num_train": self.num_train, "num_heldout": self.num_heldout, **settings,
                "final_train_loss": self.losses[-1], "torch": torch.__version__, "reproduce": reproduce}


def train_classifier(dataset: Dataset = "digits", *, seed: int = 0, epochs: int | None = None,
                     batch_size: int = _BATCH_SIZE, lr: float = _LR, noise_max: float = _NOISE_MAX,
                     heldout_fraction: float = _HELDOUT_FRACTION, limit: int | None = None,
                     data: tuple[Tensor, Tensor] | None = None) -> ClassifierResult:
    """Train a :class:`~implicit_diffusion.models.classifier.DigitClassifier` on ``dataset`` (module docstring).

    Args:
        dataset: ``"digits"`` (8×8) or ``"mnist5k"`` (28×28).
        seed: seeds the split, the initialisation, the batches and the augmentation.
        epochs: passes over the training split (``None``: 40 for digits, 15 for mnist5k).
        noise_max: largest standard deviation of the training noise (pixels span 2); 0 turns it off.
        limit: train on the first ``limit`` training images only (a smoke run); the held-out split is unchanged.
        data: ``(images, labels)`` to use instead of loading ``dataset`` (its recipe settings still apply).

    Returns a :class:`ClassifierResult`; the accuracy is on the clean held-out split.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; allowed: {', '.join(DATASETS)}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be a positive integer (or None for the recipe's), got {epochs!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer (or None for the whole training split), got {limit!r}")
    start = time.perf_counter()
    images, labels = data if data is not None else load_labelled(dataset)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"data must be images (N, 1, H, W) and labels (N,), got shapes {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    train_idx, held_idx = heldout_split(labels, seed=seed, fraction=heldout_fraction)
    if limit is not None:
        train_idx = train_idx[:limit]
    x_train, y_train = images[train_idx], labels[train_idx]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # layer initialisation draws from the global RNG:
        torch.manual_seed(seed)  # seed it here, and leave the caller's state as it was
        model = DigitClassifier(images.shape[-1])
    epochs = _EPOCHS[dataset] if epochs is None else epochs
    steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(1, epochs * steps_per_epoch))))
    model.train()
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(x_train.shape[0], generator=generator)
        total = 0.0
        for i in range(0, perm.numel(), batch_size):
            idx = perm[i:i + batch_size]
            x = _augment(x_train[idx], shift=_SHIFT[dataset], noise_max=noise_max, generator=generator)
            loss = F.cross_entropy(model(x), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * idx.numel()
        losses.append(total / perm.numel())
    model.eval()
    accuracy, correct = heldout_accuracy(model, images[held_idx], labels[held_idx])
    return ClassifierResult(model, accuracy, correct, int(train_idx.numel()), int(held_idx.numel()), losses,
                            time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """``python -m implicit_diffusion.training.classifier --dataset digits|mnist5k --out PATH [--seed 0]``."""
    parser = argparse.ArgumentParser(prog="python -m implicit_diffusion.training.classifier",
                                     description="Train a digit classifier and write it as safetensors.")
    parser.add_argument("--dataset", choices=DATASETS, required=True)
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: 40 (digits), 15 (mnist5k)")
    args = parser.parse_args(argv)
    # one thread: the float sums (hence the weights) do not depend on the machine's core count
    torch.set_num_threads(1)
    result = train_classifier(args.dataset, seed=args.seed, epochs=args.epochs)
    command = ["python -m implicit_diffusion.training.classifier", "--dataset", args.dataset,
               "--out", shlex.quote(args.out), "--seed", str(args.seed)]
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    settings = {"epochs": _EPOCHS[args.dataset] if args.epochs is None else args.epochs, "batch_size": _BATCH_SIZE,
                "lr": _LR, "noise_max": _NOISE_MAX, "shift": _SHIFT[args.dataset],
                "heldout_fraction": _HELDOUT_FRACTION}
    save_classifier(args.out, result.model, metadata=result.metadata(args.dataset, args.seed, settings,
                                                                     " ".join(command)))
    print(f"{args.dataset}: held-out accuracy {result.heldout_accuracy:.4f} "
          f"({result.heldout_correct}/{result.num_heldout}, clean images; {result.num_train} training images, "
          f"{result.seconds:.0f} s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
