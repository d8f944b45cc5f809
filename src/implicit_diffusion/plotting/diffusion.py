"""Figures of the diffusion experiments: image grids, 2-D samples, training and finetuning curves.

Same conventions as :mod:`.base` (matplotlib object API on the Agg canvas, no pyplot).
Images are arrays ``(n, C, H, W)`` with pixels in [−1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import COLORS, DPI, figure, running_mean, upscale_factor, upscale_nearest

__all__ = [
    "image_grid",
    "plot_image_grids",
    "plot_loss_curve",
    "plot_points",
    "plot_finetune_curves",
    "plot_tradeoff",
    "plot_theta_trajectories",
]


def image_grid(images, ncols: int = 8, pad: int = 1) -> np.ndarray:
    """Tile ``(n, C, H, W)`` images in [−1, 1] into one ``(rows·(H+pad)−pad, cols·(W+pad)−pad, C)``
    array in [0, 1] (C = 1 squeezed to 2-D), padding in white."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"images must have shape (n, C, H, W), got {x.shape}")
    n, c, h, w = x.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    out = np.ones((nrows * (h + pad) - pad, ncols * (w + pad) - pad, c))
    for i in range(n):
        r, q = divmod(i, ncols)
        out[r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = x[i].transpose(1, 2, 0)
    out = np.clip((out + 1.0) / 2.0, 0.0, 1.0)
    return out[..., 0] if c == 1 else out


def plot_image_grids(path: str | Path, grids: Sequence[tuple[str, object]], *, ncols: int = 8,
                     title: str = ""):
    """One panel per ``(label, images)`` (e.g. samples at several finetuning iterations), at most
    two panels a row when there are more than two; returns the figure.

    Small images are upscaled by nearest neighbour (:func:`.base.upscale_nearest`, each pixel a
    k × k block with k = ⌈64/H⌉) and the figure is sized so that every image is drawn at least
    64 pixels wide: an 8×8 digit shows its strokes instead of a blur."""
    side = int(np.asarray(grids[0][1]).shape[-2])
    k = upscale_factor(side)
    tiles = [upscale_nearest(image_grid(images, ncols), k) for _, images in grids]
    per_row = len(grids) if len(grids) <= 2 else -(-len(grids) // 2)
    rows = -(-len(grids) // per_row)
    h, w = tiles[0].shape[:2]
    fig = figure(per_row * (w / DPI + 0.25) + 0.2, rows * (h / DPI + 0.4) + (0.4 if title else 0.1))
    axes = fig.subplots(rows, per_row, squeeze=False).ravel()
    for ax, tile, (label, _) in zip(axes, tiles, grids):
        ax.imshow(tile, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    for ax in axes[len(grids):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    return fig


def plot_points(path: str | Path, panels: Sequence[tuple[str, np.ndarray]], *, title: str = "") -> None:
    """Scatter plots of 2-D point sets ``(n, 2)`` side by side, on shared axes."""
    fig = figure(3.3 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    for i, (ax, (label, pts)) in enumerate(zip(axes, panels)):
        pts = np.asarray(pts)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4, color=COLORS[i % len(COLORS)])
        ax.set_title(label, fontsize=9)
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)


def plot_loss_curve(path: str | Path, losses: np.ndarray, *, window: int = 200) -> None:
    """Training loss per step (light) and its running mean (dark), log-scaled y."""
    fig = figure(6.0, 3.4)
    ax = fig.subplots()
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color=COLORS[0], alpha=0.25, lw=0.6)
    ax.plot(steps, running_mean(losses, window), color=COLORS[0], lw=1.5, label=f"running mean ({window})")
    ax.set_xlabel("training step")
    ax.set_ylabel("denoising score-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_finetune_curves(path: str | Path, runs: dict[str, dict[str, np.ndarray]], *, reward_name: str,
                         xlabel: str = "iteration"):
    """Two panels against the iteration counter ``step``: evaluation reward ± 1 SE, and path KL
    ± 1 SE; returns the figure.

    ``runs[label]`` has arrays ``step``, ``reward``, ``reward_se``, ``kl``, ``kl_se``. The finetuning
    loop counts iterations (the pipelined queue makes no θ update while it fills), hence the default
    ``xlabel``; the sample grids of the same run are titled in the same unit.
    """
    fig = figure(10.0, 3.8)
    ax_r, ax_k = fig.subplots(1, 2)
    for i, (label, r) in enumerate(runs.items()):
        color = COLORS[i % len(COLORS)]
        for ax, key in ((ax_r, "reward"), (ax_k, "kl")):
            y, se = np.asarray(r[key]), np.asarray(r[f"{key}_se"])
            ax.plot(r["step"], y, color=color, lw=1.4, marker="o", ms=3, label=label)
            ax.fill_between(r["step"], y - se, y + se, color=color, alpha=0.2)
    ax_r.set_ylabel(f"mean {reward_name} of samples (± 1 SE)")
    ax_k.set_ylabel("KL(path_θ ‖ path_θ₀) (± 1 SE)")
    for ax in (ax_r, ax_k):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)
    return fig


def plot_tradeoff(path: str | Path, points: dict[str, tuple[float, float, float, float]], *,
                  reward_name: str, base_reward: float | None = None) -> None:
    """Final reward against path KL for each run: ``points[label] = (kl, kl_se, reward, reward_se)``."""
    fig = figure(5.5, 4.0)
    ax = fig.subplots()
    for i, (label, (kl, kl_se, rew, rew_se)) in enumerate(points.items()):
        ax.errorbar(kl, rew, xerr=kl_se, yerr=rew_se, fmt="o", color=COLORS[i % len(COLORS)], capsize=3,
                    label=label)
    if base_reward is not None:
        ax.axhline(base_reward, color="0.4", ls="--", lw=1, label="pretrained model")
    ax.set_xlabel("KL(path_θ ‖ path_θ₀)")
    ax.set_ylabel(f"mean {reward_name} of samples")
    kls = [kl for kl, *_ in points.values()]
    if min(kls) > 0 and max(kls) > 20 * min(kls):
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)


def plot_theta_trajectories(path: str | Path, curves: dict[str, np.ndarray], optimum: float, *,
                            ylabel: str = "θ", title: str = "") -> None:
    """Parameter trajectories against iterations, with the exact optimum as a dashed line."""
    fig = figure(6.5, 3.8)
    ax = fig.subplots()
    for i, (label, values) in enumerate(curves.items()):
        ax.plot(np.arange(1, len(values) + 1), values, color=COLORS[i % len(COLORS)], lw=1.3, label=label)
    ax.axhline(optimum, color="k", ls="--", lw=1, label="exact optimum")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
