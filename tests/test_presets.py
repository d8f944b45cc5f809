"""``run NAME --preset P``: an experiment's named settings, under --config and --set."""

from __future__ import annotations

import tomllib

from implicit_diffusion.cli import main
from implicit_diffusion.experiments import diffusion_finetune as ft

TINY = ["--set", "num_sampling_steps=2", "--set", "num_steps=3", "--set", "batch_size=2", "--set", "eval_samples=4",
        "--set", "grid_images=2", "--set", "eval_every=3", "--no-progress"]


def test_the_mnist5k_preset_is_section_5_2_at_m_50():
    preset = ft.PRESETS["mnist5k"]
    assert preset["model"] == "mnist5k" and preset["num_sampling_steps"] >= 50
    assert ft.Config(**preset).num_sampling_steps == preset["num_sampling_steps"]  # every key is a valid setting


def test_a_preset_is_applied_and_set_overrides_it(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "diffusion-finetune", "--preset", "mnist5k", *TINY, "--out", str(out)]) == 0
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["model"] == "mnist5k" and saved["batch_size"] == 2 and saved["num_sampling_steps"] == 2
    assert "shipped 'mnist5k' model" in capsys.readouterr().out


def test_an_unknown_preset_is_one_line_naming_the_available_ones(tmp_path, capsys):
    assert main(["run", "diffusion-finetune", "--preset", "cifar", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "implicit-diffusion: error: unknown preset 'cifar' for diffusion-finetune; available: mnist5k"
    assert not (tmp_path / "r").exists()
    assert main(["run", "rates", "--preset", "mnist5k", "--out", str(tmp_path / "s")]) == 2
    assert "unknown preset 'mnist5k' for rates; it has none" in capsys.readouterr().err


def test_list_shows_the_presets(capsys):
    assert main(["list"]) == 0
    assert "--preset mnist5k" in capsys.readouterr().out
    assert main(["list", "diffusion-finetune"]) == 0
    assert "--preset mnist5k: model = 'mnist5k', num_sampling_steps = 50" in capsys.readouterr().out
