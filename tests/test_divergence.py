"""Divergence: a step size too large stops the run within one update, keeping what was finite."""

from __future__ import annotations

import json
import math

import pytest
import torch

from implicit_diffusion.cli import main
from implicit_diffusion.errors import DivergenceError
from implicit_diffusion.runtime.checkpoints import load_checkpoint
from implicit_diffusion.runtime.guards import DivergenceGuard


def test_the_guard_names_what_became_non_finite():
    theta = torch.nn.Parameter(torch.zeros(3))
    guard = DivergenceGuard([theta], "a smaller step_size")
    guard(0, torch.ones(4, 2), {})  # finite: nothing happens
    x = torch.ones(4, 2)
    x[1, 0] = float("nan")
    x[3, 1] = float("inf")
    with pytest.raises(DivergenceError, match=r"diverged at update 8: 2 of 4 particles became non-finite .* "
                                              r"Try a smaller step_size"):
        guard(7, x, {})
    with torch.no_grad():
        theta[0] = float("nan")
    with pytest.raises(DivergenceError, match=r"update 1: the parameters θ became non-finite"):
        guard(0, torch.ones(4, 2), {})


def test_a_diverging_run_stops_at_once_and_keeps_its_last_finite_checkpoint(tmp_path, capsys):
    """γ = 50 on the hexagon mixture: ULA multiplies the distance to a mode by ~49 per step and
    overflows float32 after ~20 steps. The run must stop at the first non-finite update (exit 2,
    a one-line message suggesting a smaller step size), with every metric recorded before it
    finite and a checkpoint from before the divergence."""
    out = tmp_path / "run"
    rc = main(["run", "langevin-mixture", "--set", "step_size=50", "--checkpoint-every", "5", "--no-progress",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "diverged at update" in err and "smaller step_size (now 50)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    update = int(err.split("diverged at update ")[1].split(":")[0])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "reward" in r]
    assert steps == list(range(update - 1))  # every update before the bad one, and not the bad one
    assert all(math.isfinite(r["reward"]) for r in records if "reward" in r)
    tensors, meta = load_checkpoint(out / "checkpoint.safetensors")
    assert meta["step"] == 5 * ((update - 1) // 5) and torch.isfinite(tensors["particles"]).all()
    assert not (out / "summary.json").exists()


def test_rates_stops_on_divergence_with_a_one_line_error(tmp_path, capsys):
    """A θ learning rate far too large for the quadratic reward makes θ blow up; the rates study
    stops at the first non-finite θ instead of fitting slopes to NaN."""
    rc = main(["run", "rates", "--set", "lr=1e6", "--set", "num_steps=200", "--set", "num_seeds=1",
               "--no-progress", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "diverged at update" in err and "lr (now 1e+06)" in err and "Traceback" not in err


def test_diffusion_finetune_stops_on_divergence_with_a_one_line_error(tmp_path, capsys):
    """Adam at lr = 100 without clipping wrecks the U-Net within a few updates: the run stops with
    a DivergenceError naming the iteration and the settings to lower, exit 2, no traceback."""
    rc = main(["run", "diffusion-finetune", "--set", "num_steps=30", "--set", "num_sampling_steps=4",
               "--set", "batch_size=2", "--set", "eval_every=30", "--set", "eval_samples=4", "--set", "grid_images=4",
               "--set", "lr=100", "--set", "max_grad_norm=1e9", "--no-progress", "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert rc == 2 and "finetuning diverged at iteration" in err and "smaller lr (now 100)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f" / "summary.json").exists()
