"""Particle blocks with their own random streams, so results do not depend on how particles are
split over processes.

The particle set is B equal blocks; block b draws its initial state and all its noise from its
own generator (:func:`block_generator`). One process holding all B blocks and W processes holding
B/W blocks each then use exactly the same random numbers for every particle, and a sharded run
reproduces the single-process one (up to the order of floating-point sums in the all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import distributed
from .langevin import LangevinInfo

__all__ = ["ParticleBlocks", "block_generator", "blockwise"]


def block_generator(seed: int, block: int, num_blocks: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of block ``block`` of ``num_blocks``, on ``device``: ``manual_seed(seed)`` when
    there is one block (the plain single-stream run), else a seed derived from (seed, block) by
    NumPy's ``SeedSequence`` (independent, well-mixed streams)."""
    if not 0 <= block < num_blocks:
        raise ValueError(f"block must lie in [0, {num_blocks}), got {block}")
    if num_blocks == 1:
        return torch.Generator(device=device).manual_seed(seed)
    derived = int(np.random.SeedSequence([seed, block]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(derived)


def blockwise(step: Callable) -> Callable:
    """A Langevin-family step taking one generator per block: ``generator`` is a sequence of G
    generators and ``x`` ``(num_particles, dim)`` is split into G equal blocks (``torch.chunk``),
    each advanced by ``step`` with its own generator. A single ``torch.Generator`` (or ``noise``)
    passes straight through. A Metropolis-adjusted step's ``acceptance_rate`` is the mean over
    blocks (equal sizes: the mean over particles)."""

    def step_blocks(x: Tensor, potential, *, step_size: float, generator=None, noise: Tensor | None = None,
                    **kwargs) -> tuple[Tensor, LangevinInfo]:
        if generator is None or isinstance(generator, torch.Generator) or noise is not None:
            return step(x, potential, step_size=step_size, generator=generator, noise=noise, **kwargs)
        gens: Sequence[torch.Generator] = tuple(generator)
        if x.shape[0] % len(gens):
            raise ValueError(f"{x.shape[0]} particles cannot be split into {len(gens)} equal blocks")
        outs = [step(xb, potential, step_size=step_size, generator=g, **kwargs)
                for xb, g in zip(x.chunk(len(gens)), gens)]
        rates = [info.acceptance_rate for _, info in outs]
        rate = None if any(r is None for r in rates) else torch.stack(rates).mean()
        return torch.cat([xb for xb, _ in outs]), LangevinInfo(rate)

    step_blocks.__name__ = step_blocks.__qualname__ = f"blockwise_{getattr(step, '__name__', 'step')}"
    return step_blocks


class ParticleBlocks:
    """The particle blocks this process holds — all ``num_blocks`` of them, or its 1/W share under
    torchrun (rank r holds blocks r·B/W … (r + 1)·B/W − 1) — with their generators (on ``device``).

    >>> blocks = ParticleBlocks(seed=0, num_blocks=2, num_particles=6)
    >>> list(blocks.blocks), blocks.initial(lambda n, g: torch.randn(n, 2, generator=g)).shape
    ([0, 1], torch.Size([6, 2]))
    """

    def __init__(self, seed: int, num_blocks: int, num_particles: int, device: torch.device | str = "cpu"):
        world = distributed.world_size()
        if num_blocks % world or num_particles % num_blocks:
            raise ValueError(f"{num_particles} particles in {num_blocks} blocks cannot be split equally over "
                             f"{world} process(es)")
        share = num_blocks // world
        self.blocks = range(distributed.rank() * share, (distributed.rank() + 1) * share)
        self.generators = [block_generator(seed, b, num_blocks, device) for b in self.blocks]
        self.per_block = num_particles // num_blocks

    @property
    def generator(self) -> torch.Generator | tuple[torch.Generator, ...]:
        """What a step takes as ``generator``: the one generator, or one per block (see :func:`blockwise`)."""
        return self.generators[0] if len(self.generators) == 1 else tuple(self.generators)

    def step(self, step: Callable) -> Callable:
        """``step`` itself for one block, else :func:`blockwise` of it."""
        return step if len(self.generators) == 1 else blockwise(step)

    def initial(self, draw: Callable[[int, torch.Generator], Tensor]) -> Tensor:
        """This process's initial particles: ``draw(per_block, generator)`` for each of its blocks, concatenated."""
        return torch.cat([draw(self.per_block, g) for g in self.generators])

    def named_generators(self, prefix: str = "generator.") -> dict[str, torch.Generator]:
        """The generators by global block index (a checkpoint's names for them)."""
        return {f"{prefix}{b}": g for b, g in zip(self.blocks, self.generators)}
