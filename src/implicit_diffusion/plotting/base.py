"""What every figure shares: a matplotlib figure on the Agg canvas (object API: no pyplot, no
global state, matplotlib imported only when a figure is drawn), the colour cycle, a running mean."""

from __future__ import annotations

import numpy as np

__all__ = ["COLORS", "figure", "running_mean"]

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]


def figure(width: float, height: float):
    """A constrained-layout figure of ``width`` × ``height`` inches at 110 dpi, drawn on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)
