"""Figures of the ``rates`` experiment: log-log running averages of ‖∇ℓ‖² and ‖θ_k − θ*‖."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .base import COLORS, figure

__all__ = ["RateCurves", "plot_rates", "plot_theta_distance"]

_RULE_LABELS = {
    "decreasing": "η_k = c/√k, ε_k = 1/√k",
    "constant": "constant η, ε = 1",
    "continuous": "small h, ε_t = min(1, 1/√t)",
}


def _band(ax, x: np.ndarray, per_seed: np.ndarray, color: str, label: str) -> None:
    """Median over seeds as a line, min–max over seeds as a band; x thinned to log-spaced points."""
    idx = np.unique(np.geomspace(1, len(x), 400).astype(int) - 1)
    ax.fill_between(x[idx], per_seed[:, idx].min(0), per_seed[:, idx].max(0), color=color, alpha=0.2, lw=0)
    ax.plot(x[idx], np.median(per_seed[:, idx], 0), color=color, lw=1.5, label=label)


def _reference(ax, x0: float, y0: float, x1: float, exponent: float, style: str, label: str) -> None:
    """The line y = y0 (x/x0)^exponent on [x0, x1]."""
    xs = np.array([x0, x1])
    ax.plot(xs, y0 * (xs / x0) ** exponent, color="0.35", ls=style, lw=1.1, label=label)


class RateCurves(NamedTuple):
    """One step-size rule's numbers: its x axis and, per seed, the two averages and their fits."""

    x: np.ndarray  # (K,): K itself, or T = K·h for the continuous proxy
    axis: str  # "K" or "T"
    average: np.ndarray  # A_K per seed, (num_seeds, K)
    tail: np.ndarray  # B_K per seed, (num_seeds, K)
    fits: dict[str, np.ndarray]  # "average" / "tail" → fitted (slope, intercept) per seed, (num_seeds, 2)


def plot_rates(path: str | Path, curves: dict[str, RateCurves], *, fit_from: float, title: str) -> None:
    """Top: A_K = (1/K)Σ_{k≤K}‖∇ℓ(θ_k)‖²; bottom: B_K, the mean over K/2 < k ≤ K (no early transient).
    Discrete rules against K (left), the continuous proxy against T = Kh (right); fitted slopes dashed
    over the fit range [``fit_from``·x_max, x_max], reference lines K^{−1/3} and K^{−1/2} anchored at the
    first curve's fit start. ``curves``: rule → :class:`RateCurves`."""
    discrete = [r for r in curves if r != "continuous"]
    panels = [p for p in (discrete, ["continuous"] if "continuous" in curves else []) if p]
    fig = figure(5.6 * len(panels), 8.2)
    grid = fig.subplots(2, len(panels), squeeze=False)
    for row, quantity in enumerate(("average", "tail")):
        for ax, rules in zip(grid[row], panels):
            anchor = None
            for rule in rules:
                color = COLORS[list(_RULE_LABELS).index(rule)]
                c = curves[rule]
                x, name = c.x, c.axis
                s = c.fits[quantity][:, 0]
                sd = s.std(ddof=1) if len(s) > 1 else 0.0
                label = f"{_RULE_LABELS[rule]}: slope {s.mean():+.2f} ± {sd:.2f}"
                _band(ax, x, c.average if quantity == "average" else c.tail, color, label)
                x_fit = np.geomspace(fit_from * x[-1], x[-1], 20)
                b = np.median(c.fits[quantity][:, 1])
                y_fit = np.exp(b) * x_fit ** np.median(s)
                ax.plot(x_fit, y_fit, color=color, ls=(0, (5, 2)), lw=2.2, alpha=0.8)
                if anchor is None:
                    anchor = (x_fit[0], float(y_fit[0]), x[-1], name)
            x0, y0, x1, name = anchor
            _reference(ax, x0, 3 * y0, x1, -1 / 3, ":", f"{name}^(−1/3) (discrete bound)")
            _reference(ax, x0, 3 * y0, x1, -1 / 2, "-.", f"{name}^(−1/2) (continuous bound)")
            ax.axvline(x0, color="0.7", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("K (iterations)" if name == "K" else "T = K·h (continuous time)")
            ax.set_ylabel(f"(1/{name}) Σ_(k≤{name}) ‖∇ℓ(θ_k)‖²" if quantity == "average"
                          else f"mean of ‖∇ℓ(θ_k)‖² over {name}/2 < k ≤ {name}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7.5, loc="lower left")
    fig.suptitle(title, fontsize=9.5)
    fig.savefig(path)


def plot_theta_distance(path: str | Path, thetas: dict[str, np.ndarray], optimum: np.ndarray) -> None:
    """‖θ_k − θ*‖ against k for every rule (median over seeds, min–max band), log-log.
    ``thetas``: rule → θ_0..θ_K per seed, ``(num_seeds, K + 1, d)``; ``optimum``: θ*, ``(d,)``."""
    fig = figure(6.5, 4.2)
    ax = fig.subplots()
    for rule, per_seed in thetas.items():
        dist = np.linalg.norm(per_seed[:, 1:] - optimum, axis=-1)
        k = np.arange(1, dist.shape[1] + 1, dtype=np.float64)
        _band(ax, k, dist, COLORS[list(_RULE_LABELS).index(rule)], _RULE_LABELS[rule])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("iteration k")
    ax.set_ylabel("‖θ_k − θ*‖")
    ax.set_title(f"Distance to the exact optimum θ* = {tuple(np.asarray(optimum).tolist())}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path)
