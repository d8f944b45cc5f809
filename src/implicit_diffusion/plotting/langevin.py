"""Figures of the Langevin experiments (§5.1): particle clouds, reward curves, mixture weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import COLORS, figure, running_mean

__all__ = [
    "STEPS_LABEL",
    "component_labels",
    "plot_particle_clouds",
    "plot_reward_curves",
    "plot_mixture_weights",
]


def _mixture_density(grid: np.ndarray, means: np.ndarray, weights: np.ndarray, variance: float) -> np.ndarray:
    sq = ((grid[..., None, :] - means) ** 2).sum(-1)
    return (np.exp(-sq / (2 * variance)) / (2 * np.pi * variance)) @ weights


STEPS_LABEL = "sampler steps"  # the one x unit of a langevin-mixture run's figures (the comparisons share it)


def component_labels(n: int) -> list[str]:
    """``["c1", …, "cn"]``: the names of the mixture components, the same in every figure."""
    return [f"c{i + 1}" for i in range(n)]


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
    steps_per_update: int = 1,
):
    """One panel per snapshot: particles (dots) over contours of the mixture density at θ_k, each
    component named c1 … cn at its mean ``means[i]`` (in the colour :func:`plot_mixture_weights`
    gives it), axes in x₁, x₂; returns the figure.

    ``snapshots`` and ``weights`` are keyed by the θ-update index k; panels are titled in sampler
    steps, k · ``steps_per_update``, the unit of the reward and weight figures.
    ``extra`` adds panels ``label -> (particles, weights)`` (e.g. samples of V − λR_s).
    """
    panels = [(f"{STEPS_LABEL} {k * steps_per_update:,}", snapshots[k], weights[k]) for k in sorted(snapshots)]
    panels += [(label, p, w) for label, (p, w) in (extra or {}).items()]
    fig = figure(3.1 * len(panels) + 0.4, 3.7)
    fig.get_layout_engine().set(h_pad=0.1)  # equal-aspect panels: the default pad clips the x label
    lim = np.abs(means).max() + 3.5
    ax_grid = np.linspace(-lim, lim, 160)
    gx, gy = np.meshgrid(ax_grid, ax_grid)
    grid = np.stack([gx, gy], -1)
    axes = fig.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    for ax, (label, particles, w) in zip(axes, panels):
        dens = _mixture_density(grid, means, w, variance)
        ax.contourf(gx, gy, dens, levels=12, cmap="Blues")
        shown = particles[:: max(1, len(particles) // 5000)]  # at most ~5,000 dots: a cloud, not a blot
        ax.scatter(shown[:, 0], shown[:, 1], s=2, c="#d62728", alpha=0.5, linewidths=0)
        if reward_centre is not None:
            ax.plot(*reward_centre, marker="*", color="gold", markersize=12, markeredgecolor="k")
        for i, (name, (mx, my)) in enumerate(zip(component_labels(len(means)), means)):
            ax.text(mx, my, name, ha="center", va="center", fontsize=8, fontweight="bold",
                    color=COLORS[i % len(COLORS)],
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.75})
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("x₁")
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("x₂")
    fig.suptitle(title, fontsize=11)
    fig.savefig(path)
    return fig


def plot_reward_curves(
    path: str | Path,
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    exact: tuple[np.ndarray, np.ndarray] | None = None,
    hlines: dict[str, float] | None = None,
    kl: tuple[np.ndarray, np.ndarray] | None = None,
    window: int = 50,
):
    """Mean reward of the particles against sampler steps (running mean over ``window`` points),
    the exact E_{π*(θ)}[R] of the single loop, reference levels, and optionally KL in a second panel;
    returns the figure. Every x is in sampler steps (:data:`STEPS_LABEL`), the budget the methods share."""
    fig = figure(10 if kl is not None else 6.5, 4)
    axes = fig.subplots(1, 2 if kl is not None else 1, squeeze=False)[0]
    ax = axes[0]
    for i, (label, (steps, values)) in enumerate(curves.items()):
        ax.plot(steps, running_mean(values, window), color=COLORS[i % len(COLORS)], lw=1.4, label=label)
    if exact is not None:
        ax.plot(*exact, "k--", lw=1.2, label="E_π*(θ_k)[R] (exact)")
    for j, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color="0.5", ls=[":", "-."][j % 2], lw=1, label=label)
    ax.set_xlabel(STEPS_LABEL)
    ax.set_ylabel(f"mean reward (running mean, {window})")
    ax.set_xscale("log")
    ax.set_xlim(left=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if kl is not None:
        ax2 = axes[1]
        ax2.plot(*kl, color=COLORS[0])
        ax2.set_xlabel(STEPS_LABEL)
        ax2.set_ylabel("KL(π*(θ_k) ‖ π*(θ₀))")
        ax2.set_xscale("log")
        ax2.set_xlim(left=1)
        ax2.grid(alpha=0.3)
    fig.savefig(path)
    return fig


def plot_mixture_weights(path: str | Path, steps: np.ndarray, weights: np.ndarray, labels: list[str], *,
                         steps_per_update: int = 1):
    """Stacked mixture weights softmax(θ_k) ``(len(steps), n)`` at θ-update indices ``steps``, drawn
    against sampler steps (k · ``steps_per_update``, as the reward figure; a second axis on top
    counts θ updates when the two differ); returns the figure. ``labels`` name the components as
    :func:`plot_particle_clouds` does (``component_labels``), in the same colours."""
    fig = figure(6.5, 3.6)
    ax = fig.subplots()
    x = np.asarray(steps) * steps_per_update
    ax.stackplot(x, np.asarray(weights).T, labels=labels, colors=COLORS[: len(labels)], alpha=0.85)
    ax.set_xlabel(STEPS_LABEL)
    ax.set_ylabel("mixture weight")
    ax.set_ylim(0, 1)
    ax.set_xlim(x[0], x[-1])
    if steps_per_update != 1:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_update, lambda k: k * steps_per_update))
        top.set_xlabel(f"θ updates ({steps_per_update} sampler steps each)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.savefig(path)
    return fig
