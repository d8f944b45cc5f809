"""Experiments: each a frozen config dataclass and ``run(config) -> result``."""

from . import langevin_mixture

__all__ = ["langevin_mixture", "EXPERIMENTS"]

# name → module with ``Config``-class attribute and ``run``; the CLI looks experiments up here.
EXPERIMENTS = {
    "langevin-mixture": langevin_mixture,
}
