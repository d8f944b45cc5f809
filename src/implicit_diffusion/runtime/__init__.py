"""How a run lives and dies: the machinery between the library and the experiments.

- :mod:`.config`: settings as frozen dataclasses, read from TOML/YAML and ``--set key=value``,
  validated before anything is written (one-line :class:`~implicit_diffusion.errors.ConfigError`);
- :mod:`.rundir`: the run directory (created empty), ``metrics.jsonl``, ``summary.json`` last;
- :mod:`.checkpoints`: the checkpoint file (safetensors + JSON, atomic) and checkpointing of a
  running experiment: every N updates, on Ctrl-C, the state to resume from;
- :mod:`.runner`: ``execute`` an experiment into a run directory, ``resume`` one, sharded under
  torchrun;
- :mod:`.recording`, :mod:`.progress`, :mod:`.guards`, :mod:`.threads`: loop callbacks (metric
  buffers, evaluations, a progress bar, divergence detection) and the thread count of a loop;
- :mod:`.report`, :mod:`.tensorboard`: reading runs back as figures and Markdown, or as
  TensorBoard scalars.

Imports flow one way: the library (models, samplers, objectives, algorithms, ...) knows nothing of
this package; experiments build on it; the command line calls the experiments through it.
"""
