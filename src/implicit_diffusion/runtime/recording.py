"""Loop callbacks of the Langevin experiments: metric buffers, exact evaluations, a progress bar.

Callbacks have the signature ``callback(k, particles, stats)`` and run after θ update k.
Per-step statistics stay on the device in a preallocated buffer and leave it in blocks, so
the loop never waits on a host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["RewardRecorder", "EvalRecorder", "ProgressBar"]


class RewardRecorder:
    """Keeps ``stats["reward"]`` of every step; hands ``{"step", "reward"}`` records to ``sink`` per block."""

    def __init__(self, num_steps: int, sink: Callable[[list[dict]], None], *, block: int = 1000,
                 dtype: torch.dtype = torch.float32):
        self._buf = torch.full((num_steps,), float("nan"), dtype=dtype)
        self._sink = sink
        self._block = block
        self._flushed = 0
        self.count = 0  # steps recorded so far

    def __call__(self, k: int, x: Tensor, stats: dict) -> None:
        self._buf[k] = stats["reward"]
        self.count = k + 1
        if self.count % self._block == 0:
            self.flush()

    def flush(self) -> None:
        """Hand over every recorded step not yet handed over (also after an interruption)."""
        upto = self.count
        if upto > self._flushed:
            vals = self._buf[self._flushed:upto].tolist()
            self._sink([{"step": self._flushed + i, "reward": v} for i, v in enumerate(vals)])
            self._flushed = upto

    def values(self) -> np.ndarray:
        return self._buf.double().numpy().copy()

    def state(self, prefix: str = "rewards") -> tuple[dict[str, Tensor], dict]:
        """Checkpoint: everything recorded so far (handed to the sink first, so the metrics file
        is complete up to here)."""
        self.flush()
        return {prefix: self._buf[: self.count].clone()}, {"count": self.count}

    def load_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str = "rewards") -> None:
        """Resume: the steps recorded before the checkpoint, already in the metrics file."""
        n = int(meta["count"])
        self._buf[:n] = tensors[prefix]
        self.count = self._flushed = n


class EvalRecorder:
    """Every ``every`` updates: exact E_{π*(θ)}[R] = Σₖ softmax(θ)ₖ eₖ, KL(π*(θ)‖π*(θ₀)), weights."""

    def __init__(self, potential, every: int, num_steps: int, component_rewards: np.ndarray,
                 mixture_kl: Callable[[np.ndarray], float], snapshot_steps: list[int],
                 sink: Callable[[list[dict]], None], gather: Callable[[Tensor], Tensor] = lambda x: x):
        self.potential = potential
        self.every = every
        self.num_steps = num_steps
        self.component_rewards = component_rewards
        self.mixture_kl = mixture_kl
        self.snapshot_steps = set(snapshot_steps)
        self.sink = sink
        self.gather = gather  # the particles of a snapshot from every process (sharded runs)
        self.steps: list[int] = []
        self.exact_rewards: list[float] = []
        self.kls: list[float] = []
        self.weights: list[np.ndarray] = []
        self.snapshots: dict[int, np.ndarray] = {}
        self.snapshot_weights: dict[int, np.ndarray] = {}

    def __call__(self, k: int, x: Tensor, stats: dict) -> None:
        done = k + 1  # θ updates so far
        if done % self.every == 0 or done == self.num_steps or done in self.snapshot_steps:
            self.record(done, x)

    def record(self, done: int, x: Tensor) -> None:
        w = torch.softmax(self.potential.logits.detach().double(), 0).numpy()
        if done in self.snapshot_steps:
            self.snapshots[done] = self.gather(x.detach()).double().numpy().copy()
            self.snapshot_weights[done] = w
        if done % self.every and done != self.num_steps and done != 0:
            return
        self.steps.append(done)
        self.exact_rewards.append(float(w @ self.component_rewards))
        self.kls.append(self.mixture_kl(w))
        self.weights.append(w)
        self.sink([{"step": done, "exact_reward": self.exact_rewards[-1], "kl": self.kls[-1],
                    "weights": w.tolist()}])


    def state(self, prefix: str = "evals") -> tuple[dict[str, Tensor], dict]:
        """Checkpoint: the evaluations and snapshots so far."""
        weights = np.array(self.weights, dtype=np.float64).reshape(len(self.weights), -1)
        tensors = {f"{prefix}.weights": torch.from_numpy(weights)}
        for step, arr in self.snapshots.items():
            tensors[f"{prefix}.snapshot.{step}"] = torch.from_numpy(arr)
            tensors[f"{prefix}.snapshot_weights.{step}"] = torch.from_numpy(self.snapshot_weights[step])
        return tensors, {"steps": self.steps, "exact_rewards": self.exact_rewards, "kls": self.kls,
                         "snapshot_steps": sorted(self.snapshots)}

    def load_state(self, tensors: dict[str, Tensor], meta: dict, prefix: str = "evals") -> None:
        self.steps = list(meta["steps"])
        self.exact_rewards = list(meta["exact_rewards"])
        self.kls = list(meta["kls"])
        self.weights = list(tensors[f"{prefix}.weights"].numpy())
        self.snapshots = {s: tensors[f"{prefix}.snapshot.{s}"].numpy() for s in meta["snapshot_steps"]}
        self.snapshot_weights = {s: tensors[f"{prefix}.snapshot_weights.{s}"].numpy() for s in meta["snapshot_steps"]}


class ProgressBar:
    """A tqdm bar as a loop callback, updated every ``chunk`` steps to keep the loop cheap."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, chunk: int = 50, initial: int = 0):
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.chunk = chunk
        self._bar = None
        self._shown = initial  # a resumed run starts part-way

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit="step", leave=False, dynamic_ncols=True,
                             initial=self._shown)
        return self

    def __call__(self, k: int, x: Tensor, stats: dict) -> None:
        if self._bar is not None and (k + 1) % self.chunk == 0:
            self._bar.update(k + 1 - self._shown)
            self._shown = k + 1

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
