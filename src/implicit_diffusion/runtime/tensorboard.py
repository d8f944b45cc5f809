"""Optional TensorBoard output: the records written to ``metrics.jsonl`` mirrored as scalars.

``implicit-diffusion run NAME --tensorboard`` adds this sink beside the JSONL file: every numeric
field of a record becomes a scalar tagged ``[label/]name`` at the record's step (the first of
``step``, ``update``, ``sampler_steps``, ``K`` it has; the label joins its ``method``,
``algorithm``, ``run``, ``rule``, ``seed`` fields), written to ``RUN_DIR/tensorboard``. View with
``tensorboard --logdir RUN_DIR/tensorboard``. Needs the optional dependency ``tensorboard``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError
from .report import record_scalars

__all__ = ["TensorBoardSink"]


class TensorBoardSink:
    """``sink(records)`` writing scalars with ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the optional dependency tensorboard: "
                              "pip install 'implicit-diffusion[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, records) -> None:
        if isinstance(records, dict):
            records = [records]
        for record in records:
            scalars = record_scalars(record)
            if scalars is None:
                continue
            label = "/".join(scalars.labels)
            for key, value in scalars.values.items():
                self.writer.add_scalar(f"{label}/{key}" if label else key, value, int(scalars.x))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
