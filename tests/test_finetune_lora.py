"""diffusion-finetune with ``lora_rank``: only the adapters train, the written model has them merged (plain
names, loadable as any model file) and the adapters are also written alone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from implicit_diffusion.cli import main
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import diffusion_finetune as ft
from implicit_diffusion.models.io import load_score_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    assert main(["pretrain", "digits", "--set", "num_steps=5", "--set", "base_channels=8", "--set", "num_samples=4",
                 "--set", "sampling_steps=3", "--no-progress", "--out", str(out)]) == 0
    return out / "model.safetensors"


@pytest.mark.parametrize("rank", [0, -2])
def test_a_rank_that_is_not_positive_is_refused(rank):
    with pytest.raises(ConfigError, match=f"'lora_rank' must be None .* or an integer > 0, got {rank}"):
        ft.Config(lora_rank=rank)


@pytest.mark.parametrize("algorithm", ["nested-autograd", "queue-pipelined"])
def test_lora_finetuning_changes_the_weights_by_low_rank_deltas_only(algorithm, tiny_model, tmp_path):
    """Every weight of the merged model minus the pretrained one has rank ≤ r (as (out, fan_in)); biases and
    norms are the pretrained ones bit for bit; some weight did move."""
    out, rank = tmp_path / "run", 2
    assert main(["run", "diffusion-finetune", "--set", f"model='{tiny_model}'", "--set", "num_steps=6",
                 "--set", "num_sampling_steps=3", "--set", "batch_size=2", "--set", "eval_every=3",
                 "--set", "eval_samples=4", "--set", "grid_images=4", "--set", f"lora_rank={rank}",
                 "--set", f"algorithm={algorithm}", "--set", "lr=0.01", "--no-progress", "--out", str(out)]) == 0
    base = load_score_model(tiny_model).model.state_dict()
    tuned = load_score_model(out / "finetuned.safetensors").model.state_dict()
    assert tuned.keys() == base.keys()  # merged: the original names, no parametrizations
    moved = 0
    for k, w in base.items():
        delta = (tuned[k] - w).double()
        if w.dim() >= 2:
            assert torch.linalg.matrix_rank(delta.reshape(w.shape[0], -1), rtol=1e-5).item() <= rank, k
            moved += bool(delta.abs().max() > 0)
        else:
            assert torch.equal(tuned[k], w), k
    assert moved > 0
    adapters = load_file(out / "lora.safetensors")
    with safe_open(out / "lora.safetensors", "pt") as f:
        meta = f.metadata()
    assert adapters and all(".lora_A" in k or ".lora_B" in k for k in adapters) and meta["rank"] == "2"
    assert json.loads((out / "summary.json").read_text())["runs"][0]["reward"] is not None
