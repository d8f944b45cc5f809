"""diffusion-finetune with ``reward = class:C``: log p(C | x) of the shipped digit classifier, and the
fraction of samples classified as C reported before and after (summary, table)."""

from __future__ import annotations

import json

import pytest

from implicit_diffusion.cli import main
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import diffusion_finetune as ft

TINY = ["--set", "num_steps=6", "--set", "num_sampling_steps=5", "--set", "batch_size=2", "--set", "eval_every=3",
        "--set", "eval_samples=16", "--set", "grid_images=4", "--no-progress"]


@pytest.mark.parametrize("spec", ["class:10", "class:x", "class:", "class:3@"])
def test_a_malformed_class_reward_is_refused_with_the_allowed_forms(spec):
    with pytest.raises(ConfigError, match=r"'reward': unknown .*allowed: brightness, red, class:C \(C in 0..9\)"):
        ft.Config(reward=spec)


def test_the_class_reward_reports_the_fraction_classified_before_and_after(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "diffusion-finetune", "--reward", "class:3", *TINY, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward"] == "class:3" and summary["model"] == "shipped 'digits' model"
    before, after = summary["pretrained_fraction_classified"], summary["runs"][0]["fraction_classified"]
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert summary["pretrained_reward"] <= 0.0  # a log-probability
    table = capsys.readouterr().out
    assert "mean log p(3 | x)" in table
    line = next(x for x in table.splitlines() if "samples classified as 3: pretrained → finetuned" in x)
    assert line.split()[-3:] == [f"{before:.1%}", "→", f"{after:.1%}"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["fraction_classified"] <= 1.0 for r in records if "eval_step" in r)


def test_a_class_reward_on_a_colour_model_names_the_shapes(tmp_path):
    config = ft.Config(reward="class:3", model="photo-patches", num_steps=2, num_sampling_steps=2, batch_size=2,
                       eval_samples=2, grid_images=2, progress=False)
    with pytest.raises(ConfigError, match=r"no shipped classifier for images of shape \(3, 8, 8\)"):
        ft.run(config)
