"""diffusion-finetune exposes the pipelined queue's edges: ``queue_fill`` and ``queue_tail``, checked,
passed to the queue, and said in the summary and the table."""

from __future__ import annotations

import json

import pytest

from implicit_diffusion.cli import main
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import diffusion_finetune as ft


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    assert main(["pretrain", "digits", "--set", "num_steps=5", "--set", "base_channels=8", "--set", "num_samples=4",
                 "--set", "sampling_steps=3", "--no-progress", "--out", str(out)]) == 0
    return out / "model.safetensors"


@pytest.mark.parametrize("key, value, match", [
    ("queue_fill", "full", "'queue_fill': unknown 'full'; allowed: wait, partial"),
    ("queue_tail", "keep", "'queue_tail': unknown 'keep'; allowed: drop, apply"),
])
def test_bad_values_are_refused(key, value, match):
    with pytest.raises(ConfigError, match=match):
        ft.Config(**{key: value})


@pytest.mark.parametrize("algorithm", ["queue-sequential", "nested-adjoint"])
def test_the_edges_are_refused_where_there_are_none(algorithm):
    with pytest.raises(ConfigError, match="sets the edges of the pipelined queue"):
        ft.Config(algorithm=algorithm, queue_tail="apply")
    ft.Config(algorithm=algorithm)  # the defaults are accepted


@pytest.mark.parametrize("fill, tail", [("wait", "drop"), ("partial", "apply")])
def test_the_summary_says_what_the_edges_did(fill, tail, tiny_model, tmp_path, capsys):
    """M = 3, 8 iterations: at the end two adjoints are in flight (at steps 1 and 0), holding 2 + 1 = 3
    batch-step contributions; "apply" drains them in M − 1 = 2 updates, "drop" makes none."""
    out = tmp_path / "run"
    assert main(["run", "diffusion-finetune", "--set", f"model='{tiny_model}'", "--set", "num_steps=8",
                 "--set", "num_sampling_steps=3", "--set", "batch_size=2", "--set", "eval_every=4",
                 "--set", "eval_samples=4", "--set", "grid_images=4", "--set", f"queue_fill={fill}",
                 "--set", f"queue_tail={tail}", "--no-progress", "--out", str(out)]) == 0
    edges = json.loads((out / "summary.json").read_text())["runs"][0]["queue_edges"]
    assert edges == {"fill": fill, "tail": tail, "tail_contributions": 3, "drain_updates": 2 if tail == "apply" else 0}
    table = capsys.readouterr().out
    assert ("no θ update before iteration 4" if fill == "wait" else "the first 2 updates are partial") in table
    assert ("applied in 2 drain updates" if tail == "apply" else "3 batch-step contributions still in flight at "
            "the end dropped") in table
