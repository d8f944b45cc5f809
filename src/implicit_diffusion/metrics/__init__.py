"""Metrics: sample-based distances between laws, and convergence statistics of a run.

- :mod:`.mmd`: maximum mean discrepancy with a Gaussian (RBF) kernel, unbiased or biased;
  the closed form for two Gaussians;
- :mod:`.convergence`: running and tail averages, least-squares log-log slopes.
"""

from .convergence import fit_loglog_slope, running_average, tail_average
from .mmd import mmd2, rbf_kernel, rbf_mmd2_gaussians

__all__ = ["fit_loglog_slope", "mmd2", "rbf_kernel", "rbf_mmd2_gaussians", "running_average", "tail_average"]
