"""Convergence statistics of a run: running and tail averages, log-log slopes.

The rate study (``run rates``) compares the single loop's (1/K)Σ_{k≤K}‖∇ℓ(θ_k)‖² with the
K^{−1/3} (discrete) and T^{−1/2} (continuous-time) bounds of Marion et al. 2024: it needs the
running average A_K, the tail average B_K (without the early transient) and a least-squares
slope of log A_K against log K.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fit_loglog_slope", "running_average", "tail_average"]


def running_average(values: np.ndarray) -> np.ndarray:
    """A_K = (1/K) Σ_{k=1}^{K} values_k along the last axis."""
    values = np.asarray(values, dtype=np.float64)
    return np.cumsum(values, -1) / np.arange(1, values.shape[-1] + 1)


def tail_average(values: np.ndarray) -> np.ndarray:
    """B_K = mean of values_k over K/2 < k ≤ K (along the last axis): the running average without
    the early transient, whose share of A_K decays only like 1/K.

    >>> tail_average(np.array([4.0, 2.0, 1.0, 1.0])).tolist()
    [4.0, 2.0, 1.5, 1.0]
    """
    values = np.asarray(values, dtype=np.float64)
    c = np.concatenate([np.zeros(values.shape[:-1] + (1,)), np.cumsum(values, -1)], -1)
    k = np.arange(1, values.shape[-1] + 1)
    return (c[..., k] - c[..., k // 2]) / (k - k // 2)


def fit_loglog_slope(ks: np.ndarray, values: np.ndarray, start: float) -> tuple[float, float]:
    """Least-squares (slope s, intercept b) of log values = b + s log k over k ∈ [start, max k].

    Fitted on up to 60 log-spaced points of the range, so that each decade weighs the same
    (the dense end of a linear grid would otherwise dominate).

    >>> k = np.arange(1, 10001, dtype=float)
    >>> s, b = fit_loglog_slope(k, 3.0 * k ** -0.4, 100)
    >>> round(s, 12), round(float(np.exp(b)), 12)
    (-0.4, 3.0)
    """
    ks, values = np.asarray(ks, dtype=np.float64), np.asarray(values, dtype=np.float64)
    grid = np.geomspace(start, ks[-1], 60)
    idx = np.unique(np.clip(np.searchsorted(ks, grid), 0, len(ks) - 1))
    if len(idx) < 2:
        raise ValueError(f"fit range [{start}, {ks[-1]}] holds fewer than 2 points")
    slope, intercept = np.polyfit(np.log(ks[idx]), np.log(values[idx]), 1)
    return float(slope), float(intercept)
