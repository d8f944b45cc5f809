"""Figures: one module per experiment family, each function taking the numbers it draws.

- :mod:`.base`: the Agg figure (matplotlib object API; matplotlib is imported only when a
  figure is drawn), the colour cycle, a running mean;
- :mod:`.langevin`: §5.1 particle clouds over π*(θ_k), reward curves, mixture weights;
- :mod:`.ebm`: learned densities, MMD² curves, 8×8 sample grids;
- :mod:`.bilevel`: validation loss and θ of the hyperparameter experiment;
- :mod:`.rates`: log-log running averages of ‖∇ℓ‖² and ‖θ_k − θ*‖;
- :mod:`.diffusion`: image grids, 2-D samples, DSM loss, finetuning curves, the reward-vs-KL
  trade-off, θ trajectories.

Figures import only the library (never an experiment or the run machinery); experiments call them
from their ``save``.
"""
