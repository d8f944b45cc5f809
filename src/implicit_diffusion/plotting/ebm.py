"""Figures of the ``ebm`` experiment (matplotlib object API with the Agg canvas, as in :mod:`.base`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import COLORS, DPI, figure, upscale_factor, upscale_nearest

__all__ = ["plot_densities", "plot_mmd_curves", "plot_image_grids"]


def plot_densities(path: str | Path, panels: dict[str, tuple[np.ndarray, np.ndarray]], heldout: np.ndarray,
                   extent: tuple[float, float, float, float], *, max_points: int = 500):
    """Side by side, one panel per method: the learned density exp(−V)/Z on a grid ``(G, G)``
    (normalised on the grid, so the panels share one colour scale, shown by the colour bar), with
    held-out data (white) and the method's final particles (red) overlaid; a last panel shows the
    held-out data alone. Axes in x₁, x₂ over ``extent`` = (x₁ min, x₁ max, x₂ min, x₂ max); returns
    the figure."""
    from matplotlib.colors import Normalize

    n = len(panels) + 1
    fig = figure(3.3 * n + 0.9, 3.8)
    axes = fig.subplots(1, n, squeeze=False, sharex=True, sharey=True)[0]
    norm = Normalize(0.0, max(float(np.max(d)) for d, _ in panels.values()))
    image = None
    for ax, (title, (density, particles)) in zip(axes, panels.items()):
        image = ax.imshow(density, origin="lower", extent=extent, cmap="viridis", norm=norm, aspect="auto")
        ax.scatter(*heldout[:max_points].T, s=1.5, c="white", alpha=0.6, label="held-out data")
        ax.scatter(*particles[:max_points].T, s=1.5, c="red", alpha=0.6, label="particles")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left", markerscale=4)
    ax = axes[-1]
    ax.scatter(*heldout[:2000].T, s=1.5, c="k")
    ax.set_title("held-out data", fontsize=9)
    for ax in axes:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_xlabel("x₁")
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("x₂")
    if image is not None:
        fig.colorbar(image, ax=list(axes[:-1]), shrink=0.9, pad=0.02).set_label("learned density exp(−V)/Z",
                                                                              fontsize=8)
    fig.savefig(path)
    return fig


def plot_mmd_curves(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]], *,
                    floor: float | None = None):
    """MMD²(particles, held-out) against sampler steps, one line per method (log scale on y where positive)."""
    fig = figure(6.0, 3.6)
    ax = fig.subplots()
    for i, (label, (steps, values)) in enumerate(curves.items()):
        ax.plot(steps, values, color=COLORS[i % len(COLORS)], lw=1.4, marker=".", ms=3, label=label)
    if floor is not None:
        ax.axhline(floor, color="0.5", ls=":", lw=1, label="train vs held-out data")
    ax.set_xlabel("sampler steps (per particle)")
    ax.set_ylabel("MMD² (particles, held-out)")
    values = np.concatenate([v for _, v in curves.values()] + [np.array([floor or 0.0])])
    if (values > 0).all():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return fig


def plot_image_grids(path: str | Path, panels: dict[str, np.ndarray], *, side: int = 8, rows: int = 6,
                     cols: int = 6):
    """Grids of ``side×side`` images (rows of ``(n, side·side)`` with pixels in about [−1, 1]), one per
    panel, at most three panels a row; returns the figure.

    The grid is upscaled by nearest neighbour (:func:`.base.upscale_nearest`, each pixel a k × k
    block, k = ⌈64/side⌉) and the figure sized so that every image is drawn at least 64 pixels wide."""
    n = len(panels)
    k = upscale_factor(side)
    per_row = min(n, 3)
    grid_rows = -(-n // per_row)
    px = k * (rows * (side + 1) + 1)
    fig = figure(per_row * (k * (cols * (side + 1) + 1) / DPI + 0.25) + 0.2, grid_rows * (px / DPI + 0.45))
    axes = fig.subplots(grid_rows, per_row, squeeze=False).ravel()
    for ax, (title, images) in zip(axes, panels.items()):
        imgs = np.clip(np.asarray(images)[: rows * cols].reshape(-1, side, side), -1, 1)
        canvas = np.full((rows * (side + 1) + 1, cols * (side + 1) + 1), -1.0)
        for i, img in enumerate(imgs):
            r, c = divmod(i, cols)
            canvas[1 + r * (side + 1): 1 + r * (side + 1) + side, 1 + c * (side + 1): 1 + c * (side + 1) + side] = img
        ax.imshow(upscale_nearest(canvas, k), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.savefig(path)
    return fig
