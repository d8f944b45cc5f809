"""Figures of the Langevin experiments (§5.1): particle clouds, reward curves, mixture weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import COLORS, figure, running_mean

__all__ = [
    "plot_particle_clouds",
    "plot_reward_curves",
    "plot_mixture_weights",
]


def _mixture_density(grid: np.ndarray, means: np.ndarray, weights: np.ndarray, variance: float) -> np.ndarray:
    sq = ((grid[..., None, :] - means) ** 2).sum(-1)
    return (np.exp(-sq / (2 * variance)) / (2 * np.pi * variance)) @ weights


def plot_particle_clouds(
    path: str | Path,
    snapshots: dict[int, np.ndarray],
    weights: dict[int, np.ndarray],
    means: np.ndarray,
    *,
    variance: float = 1.0,
    reward_centre: tuple[float, float] | None = None,
    title: str = "Particles over the density of π*(θ_k)",
    extra: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> None:
    """One panel per snapshot: particles (dots) over contours of the mixture density at θ_k.

    ``extra`` adds panels ``label -> (particles, weights)`` (e.g. samples of V − λR_s).
    """
    panels = [(f"step {k}", snapshots[k], weights[k]) for k in sorted(snapshots)]
    panels += [(label, p, w) for label, (p, w) in (extra or {}).items()]
    fig = figure(3.1 * len(panels), 3.3)
    lim = np.abs(means).max() + 3.5
    ax_grid = np.linspace(-lim, lim, 160)
    gx, gy = np.meshgrid(ax_grid, ax_grid)
    grid = np.stack([gx, gy], -1)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, particles, w) in zip(axes, panels):
        dens = _mixture_density(grid, means, w, variance)
        ax.contourf(gx, gy, dens, levels=12, cmap="Blues")
        shown = particles[:: max(1, len(particles) // 5000)]  # at most ~5,000 dots: a cloud, not a blot
        ax.scatter(shown[:, 0], shown[:, 1], s=2, c="#d62728", alpha=0.5, linewidths=0)
        if reward_centre is not None:
            ax.plot(*reward_centre, marker="*", color="gold", markersize=12, markeredgecolor="k")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(label, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    fig.savefig(path)


def plot_reward_curves(
    path: str | Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    exact: tuple[np.ndarray, np.ndarray] | None = None,
    hlines: dict[str, float] | None = None,
    kl: tuple[np.ndarray, np.ndarray] | None = None,
    window: int = 50,
) -> None:
    """Mean reward of the particles against sampler steps (running mean over ``window`` points),
    the exact E_{π*(θ)}[R] of the single loop, reference levels, and optionally KL in a second panel."""
    fig = figure(10 if kl is not None else 6.5, 4)
    axes = fig.subplots(1, 2 if kl is not None else 1, squeeze=False)[0]
    ax = axes[0]
    for i, (label, (steps, values)) in enumerate(curves.items()):
        ax.plot(steps, running_mean(values, window), color=COLORS[i % len(COLORS)], lw=1.4, label=label)
    if exact is not None:
        ax.plot(*exact, "k--", lw=1.2, label="E_π*(θ_k)[R] (exact)")
    for j, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color="0.5", ls=[":", "-."][j % 2], lw=1, label=label)
    ax.set_xlabel("sampler steps")
    ax.set_ylabel(f"mean reward (running mean, {window})")
    ax.set_xscale("log")
    ax.set_xlim(left=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if kl is not None:
        ax2 = axes[1]
        ax2.plot(*kl, color=COLORS[0])
        ax2.set_xlabel("sampler steps")
        ax2.set_ylabel("KL(π*(θ_k) ‖ π*(θ₀))")
        ax2.set_xscale("log")
        ax2.set_xlim(left=1)
        ax2.grid(alpha=0.3)
    fig.savefig(path)


def plot_mixture_weights(path: str | Path, steps: np.ndarray, weights: np.ndarray, labels: list[str]) -> None:
    """Stacked mixture weights softmax(θ_k) against θ updates."""
    fig = figure(6.5, 3.6)
    ax = fig.subplots()
    ax.stackplot(steps, np.asarray(weights).T, labels=labels, colors=COLORS[: len(labels)], alpha=0.85)
    ax.set_xlabel("θ updates")
    ax.set_ylabel("mixture weight")
    ax.set_ylim(0, 1)
    ax.set_xlim(steps[0], steps[-1])
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path)
