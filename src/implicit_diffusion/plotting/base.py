"""What every figure shares: a matplotlib figure on the Agg canvas (object API: no pyplot, no
global state, matplotlib imported only when a figure is drawn), the colour cycle, a running mean,
and the nearest-neighbour upscaling that keeps small (8×8) images legible."""

from __future__ import annotations

import numpy as np

__all__ = ["COLORS", "DPI", "MIN_IMAGE_PX", "figure", "running_mean", "upscale_factor", "upscale_nearest"]

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
DPI = 110
MIN_IMAGE_PX = 64  # an image of a grid is drawn at least this many pixels wide: an 8×8 digit's strokes show


def figure(width: float, height: float):
    """A constrained-layout figure of ``width`` × ``height`` inches at 110 dpi, drawn on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` values (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def upscale_factor(side: int, min_px: int = MIN_IMAGE_PX) -> int:
    """The integer k for which a ``side``-pixel image drawn k× is at least ``min_px`` pixels (8 → 8)."""
    return max(1, -(-min_px // max(1, side)))


def upscale_nearest(image: np.ndarray, factor: int) -> np.ndarray:
    """Each pixel of ``image`` ``(H, W[, C])`` as a ``factor × factor`` block: ``(factor·H, factor·W[, C])``.

    Done on the array rather than left to ``imshow``, so the saved PNG shows sharp pixels whatever
    the resampling of the viewer that scales it (a browser shrinking a figure blurs 8×8 digits)."""
    image = np.asarray(image)
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
