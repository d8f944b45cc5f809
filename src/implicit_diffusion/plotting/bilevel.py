"""Figure of the ``hyperparameter`` experiment (matplotlib object API, Agg canvas, no pyplot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import COLORS, figure

__all__ = ["plot_bilevel"]


def plot_bilevel(
    path: str | Path,
    traces: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    theta_star: float,
    value_star: float,
    target: float | None = None,
    title: str = "",
) -> None:
    """Two panels against cumulative inner iterations (log x): ℓ(θ_k) − ℓ(θ*) (log y) and θ_k.

    ``traces`` maps a method name to ``(inner_steps, values, thetas)``, arrays of equal length
    (the first entry is the start, at 0 inner steps; it is drawn at 1 on the log axis).
    """
    fig = figure(10.5, 3.8)
    ax_l, ax_t = fig.subplots(1, 2)
    floor = np.inf
    for (name, (steps, values, thetas)), color in zip(traces.items(), COLORS):
        x = np.maximum(np.asarray(steps, dtype=np.float64), 1.0)
        gap = np.asarray(values, dtype=np.float64) - value_star
        positive = gap[gap > 0]
        if len(positive):
            floor = min(floor, positive.min())
        marker = "o" if len(x) < 200 else None
        ax_l.plot(x, np.maximum(gap, 1e-16), color=color, label=name, marker=marker, ms=3)
        ax_t.plot(x, thetas, color=color, label=name, marker=marker, ms=3)
    if target is not None and target > value_star:
        ax_l.axhline(target - value_star, color="gray", ls="--", lw=1, label="target (nested final + tol)")
    ax_l.set_xscale("log")
    ax_l.set_yscale("log")
    if np.isfinite(floor):
        ax_l.set_ylim(bottom=max(floor / 3, 1e-16))
    ax_l.set_xlabel("cumulative inner iterations (gradient steps on x)")
    ax_l.set_ylabel("validation loss ℓ(θ_k) − ℓ(θ*)")
    ax_l.legend(fontsize=8)
    ax_t.axhline(theta_star, color="black", ls=":", lw=1, label=f"θ* = {theta_star:.3f}")
    ax_t.set_xscale("log")
    ax_t.set_xlabel("cumulative inner iterations (gradient steps on x)")
    ax_t.set_ylabel("θ (log regularization)")
    ax_t.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)
