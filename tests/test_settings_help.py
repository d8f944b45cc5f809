"""A self-describing CLI: every setting carries its help text once (runtime.settings.setting), and that
text reaches ``list``, ``list NAME``, ``run NAME --help``, ``pretrain DATASET --help``, the unknown-key
error and docs/settings.md; explicit None defaults keep the behaviour of the old sentinels."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

import implicit_diffusion
from implicit_diffusion.cli import main
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import EXPERIMENTS, ebm, hyperparameter, pretrain
from implicit_diffusion.runtime.config import build_config, config_to_toml, load_config_file
from implicit_diffusion.runtime.settings import describe, experiment_summary, render_markdown, setting, settings_of

DOCS = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
JOBS = {**dict(sorted(EXPERIMENTS.items())), "pretrain": pretrain}


def flat(text: str) -> str:
    """Whitespace collapsed: the terminal output wraps long help texts."""
    return " ".join(text.split())


def undocumented(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not str(f.metadata.get("help", "")).strip()]


@pytest.mark.parametrize("name", list(JOBS))
def test_every_setting_has_a_help_text(name):
    assert undocumented(JOBS[name].Config) == []


def test_the_help_check_finds_a_setting_without_help():
    @dataclasses.dataclass(frozen=True)
    class Planted:
        documented: int = setting(1, "one")
        bare: float = 0.5

    assert undocumented(Planted) == ["bare"]
    with pytest.raises(ValueError, match="help text"):
        setting(1, "  ")


def test_allowed_values_come_from_literal_types_and_bounds():
    info = {s.name: s for s in settings_of(ebm.EBMConfig)}
    assert info["data"].allowed == "one of moons, swiss-roll, rings, digits"
    assert info["dtype"].allowed == "one of float32, float64"
    assert info["lr"].allowed == "> 0" and info["step_size"].default == "None"
    assert describe(info["num_steps"]) == "K, θ updates of the single loop. Unit: θ updates. Allowed: > 0."
    finetune = {s.name: s for s in settings_of(EXPERIMENTS["diffusion-finetune"].Config)}
    assert finetune["sampler"].allowed == "one of ddpm, euler-maruyama"
    assert finetune["reward"].allowed == "brightness, red, class:C (C in 0..9), class:C@NAME"  # a string: as given


def test_list_names_each_experiment_with_its_description(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, module in JOBS.items():
        summary = experiment_summary(module)
        assert summary and len(summary.splitlines()) == 1
        title = "pretrain DATASET" if name == "pretrain" else f"run {name}"
        assert any(line.startswith(title) and line.endswith(summary) for line in out.splitlines()), name


@pytest.mark.parametrize("name", list(JOBS))
def test_list_name_shows_every_key_with_its_default_and_meaning(name, capsys):
    assert main(["list", name]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for s in settings_of(JOBS[name].Config):
        assert f"  {s.name} = {s.default}" in lines, s.name
        assert flat(describe(s)) in flat(out), s.name


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_run_name_help_shows_the_options_then_every_key(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--set KEY=VALUE" in out and out.index("--checkpoint-every") < out.index(f"settings of {name}")
    for s in settings_of(EXPERIMENTS[name].Config):
        assert f"  {s.name} = {s.default}" in out.splitlines() and flat(s.help) in flat(out), s.name


def test_pretrain_help_shows_the_keys_of_pretrain(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "digits", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for s in settings_of(pretrain.Config):
        assert f"  {s.name} = {s.default}" in out.splitlines() and flat(s.help) in flat(out), s.name
    assert "ema_decay = 0.999" in out and "settings of ebm" not in out


def test_the_docs_table_is_the_generated_one(capsys):
    assert main(["list", "--markdown"]) == 0
    generated = capsys.readouterr().out
    assert generated == render_markdown(JOBS)
    assert DOCS.read_text(encoding="utf-8") == generated, (
        "docs/settings.md is out of date: implicit-diffusion list --markdown > docs/settings.md")
    for name, module in JOBS.items():
        assert f"## {name}" in generated
        for s in settings_of(module.Config):
            assert f"| `{s.name}` | `{s.default.replace('|', chr(92) + '|')}` |" in generated, (name, s.name)


def test_version_and_help_as_processes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "implicit_diffusion", "--version"], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"implicit-diffusion {implicit_diffusion.__version__}"
    r = subprocess.run([sys.executable, "-m", "implicit_diffusion", "run", "ebm", "--help"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert r.returncode == 0 and "  energy_penalty = None" in r.stdout.splitlines()
    assert "the data set's own (0.1 for 2-D data" in flat(r.stdout)


@pytest.mark.parametrize(("argv", "name"), [(["run", "ebm"], "ebm"), (["run", "langevin-mixture"], "langevin-mixture"),
                                            (["pretrain", "digits"], "pretrain")])
def test_an_unknown_key_points_at_list_name(argv, name, tmp_path, capsys):
    assert main([*argv, "--set", "nope=1", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'nope'" in err and f"see `implicit-diffusion list {name}`" in err
    assert not (tmp_path / "r").exists()


# --- the old sentinels, now None --------------------------------------------------------------

@pytest.mark.parametrize(("data", "expected"), [
    ("moons", (0.01, 2.0, (0.1, 0.3, 1.0), 0.1)), ("swiss-roll", (0.01, 2.0, (0.1, 0.3, 1.0), 0.1)),
    ("rings", (0.01, 2.0, (0.1, 0.3, 1.0), 0.1)), ("digits", (0.01, 0.5, (1.0, 2.0, 4.0), 0.01)),
])
def test_ebm_none_resolves_to_the_data_sets_defaults_as_the_sentinels_did(data, expected):
    """The values the old defaults (step_size = init_std = 0, energy_penalty = −1, num_heldout = 0) meant."""
    c = ebm.EBMConfig(data=data)
    assert (c.step_size, c.init_std, c.energy_penalty, c.num_heldout) == (None, None, None, None)
    assert c.resolved() == expected
    assert c.heldout_size == (300 if data == "digits" else 1000)
    given = ebm.EBMConfig(data=data, step_size=0.003, init_std=1.5, energy_penalty=0.0, num_heldout=50)
    assert given.resolved()[0:2] == (0.003, 1.5) and given.resolved()[3] == 0.0 and given.heldout_size == 50


@pytest.mark.parametrize(("key", "value", "match"), [
    ("step_size", 0.0, "'step_size' must be > 0, or None"), ("init_std", -1.0, "'init_std' must be > 0, or None"),
    ("energy_penalty", -1.0, "'energy_penalty' must be >= 0, or None"), ("num_heldout", 0, "'num_heldout'"),
])
def test_ebm_refuses_the_old_sentinels_with_a_pointer_to_none(key, value, match):
    with pytest.raises(ConfigError, match=match):
        build_config(ebm.EBMConfig, {key: value})


def read_back(config, path: Path):
    path.write_text(config_to_toml(config), encoding="utf-8")
    return build_config(type(config), load_config_file(path))


def test_explicit_values_and_none_defaults_survive_the_toml_round_trip(tmp_path):
    for name, module in JOBS.items():
        default = module.Config()
        assert read_back(default, tmp_path / f"{name}.toml") == default, name
    c = build_config(ebm.EBMConfig, {"step_size": 0.02, "num_heldout": 40})
    assert c.step_size == 0.02 and isinstance(c.step_size, float) and c.num_heldout == 40
    assert read_back(c, tmp_path / "given.toml") == c


def test_hyperparameter_none_is_the_automatic_step():
    c = hyperparameter.HyperparameterConfig(num_updates=3, nested_updates=1, grid_points=41, progress=False)
    assert c.inner_step_size is None
    r = hyperparameter.run(c)
    problem = hyperparameter.load_problem("ridge", train_fraction=c.train_fraction, seed=c.seed)
    expected = 1.0 / (problem.curvature_bound() + math.exp(max(c.theta0, r.theta_star)))
    assert r.inner_step_size == pytest.approx(expected, rel=1e-12)
    given = hyperparameter.run(dataclasses.replace(c, inner_step_size=0.5 * expected))
    assert given.inner_step_size == 0.5 * expected
    with pytest.raises(ConfigError, match="'inner_step_size' must be > 0, or None"):
        hyperparameter.HyperparameterConfig(inner_step_size=0.0)


def test_pretrain_limit_none_keeps_every_image():
    assert pretrain.Config().limit is None
    assert pretrain.Config(dataset="mnist5k").memory_estimate() == pretrain.Config(
        dataset="mnist5k", limit=5_000).memory_estimate()
    with pytest.raises(ConfigError, match="'limit' must be >= 1, or None"):
        pretrain.Config(limit=0)


@pytest.mark.parametrize("name", sorted(JOBS))
def test_a_config_error_naming_one_key_quotes_that_settings_help(name, capsys, tmp_path):
    """The help `list` prints follows the error in brackets, for every job: a seed outside its range is
    refused by the shared rules, and the message ends with the seed's own description."""
    cls = JOBS[name].Config
    seed = next(s for s in settings_of(cls) if s.name == "seed")
    with pytest.raises(ConfigError) as e:
        build_config(cls, {"seed": -1})
    assert str(e.value).startswith("config key 'seed' must be") and str(e.value).endswith(f" [seed: {describe(seed)}]")
    assert str(e.value).count("[seed: ") == 1  # explained once, though build_config and __post_init__ both explain
    with pytest.raises(ConfigError) as from_python:  # the config built from Python explains itself as well
        cls(seed=-1)
    assert str(from_python.value) == str(e.value)
    args = ["pretrain", "digits"] if name == "pretrain" else ["run", name]
    assert main([*args, "--set", "seed=-1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"[seed: {describe(seed)}]" in err and err.count("\n") == 1


def test_the_help_is_quoted_only_for_one_known_key():
    from implicit_diffusion.experiments import diffusion_finetune as ft

    lr = next(s for s in settings_of(ft.Config) if s.name == "lr")
    with pytest.raises(ConfigError, match=r"'lr' must be > 0, got -1.0 \[lr: Adam's learning rate\. Allowed: > 0\.\]$"):
        build_config(ft.Config, {"lr": -1})
    assert describe(lr) == "Adam's learning rate. Allowed: > 0."
    with pytest.raises(ConfigError) as e:  # an unknown key: the list of valid keys, no help
        build_config(ft.Config, {"lrr": 1})
    assert "[" not in str(e.value)
    with pytest.raises(ConfigError) as e:  # several keys named: no one help to quote
        build_config(ft.Config, {"model": "digits", "data": "x"})
    assert "give at most one of model" in str(e.value) and "[" not in str(e.value)
    with pytest.raises(ConfigError) as e:  # from Python too (runtime.config.explained_errors)
        ft.Config(lr=-1)
    assert str(e.value) == "config key 'lr' must be > 0, got -1 [lr: Adam's learning rate. Allowed: > 0.]"
