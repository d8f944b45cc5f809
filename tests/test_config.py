"""Config loading: TOML files, key=value overrides, validation errors naming key and allowed values."""

import pytest

from implicit_diffusion.config import build_config, config_to_toml, load_config_file, parse_overrides
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments.langevin_mixture import LangevinMixtureConfig


def test_defaults_are_the_papers():
    c = LangevinMixtureConfig()
    assert (c.num_particles, c.num_steps, c.step_size, c.lr, c.optimizer) == (1000, 5000, 0.2, 0.1, "sgd")
    assert c.theta0 == (1.5, 0.0, 1.5, 0.0, 1.5, 0.0)
    assert c.reward == "indicator"


def test_overrides_parse_toml_values_and_bare_words():
    o = parse_overrides(["lr=0.05", "optimizer=adam", 'reward="smooth"', "theta0=[1, 0, 1, 0, 1, 0]", "compare=true"])
    assert o == {"lr": 0.05, "optimizer": "adam", "reward": "smooth", "theta0": [1, 0, 1, 0, 1, 0], "compare": True}
    c = build_config(LangevinMixtureConfig, o)
    assert c.lr == 0.05 and c.optimizer == "adam" and c.theta0 == (1.0, 0.0, 1.0, 0.0, 1.0, 0.0)
    assert isinstance(c.theta0[0], float)


def test_later_sources_win(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("lr = 0.3\nnum_steps = 7\n")
    c = build_config(LangevinMixtureConfig, load_config_file(f), {"lr": 0.2})
    assert (c.lr, c.num_steps) == (0.2, 7)


def test_resolved_config_round_trips(tmp_path):
    c = build_config(LangevinMixtureConfig, {"lr": 0.02, "optimizer": "adam", "nested_inner_steps": [5]})
    f = tmp_path / "config.toml"
    f.write_text(config_to_toml(c))
    assert build_config(LangevinMixtureConfig, load_config_file(f)) == c


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"lrr": 1.0}, "unknown config key 'lrr'; valid keys:"),
        ({"optimizer": "adagrad"}, "'optimizer': expected one of 'sgd', 'adam', got 'adagrad'"),
        ({"num_steps": 2.5}, "'num_steps': expected an integer, got 2.5"),
        ({"num_steps": True}, "'num_steps': expected an integer"),
        ({"lr": "fast"}, "'lr': expected a number, got 'fast'"),
        ({"compare": 1}, "'compare': expected true or false"),
        ({"theta0": 3}, "'theta0': expected a list of a number"),
        ({"num_particles": 0}, "'num_particles' must be > 0, got 0"),
        ({"step_size": -0.1}, "'step_size' must be > 0"),
        ({"theta0": [1, 2]}, "'theta0' must have 6 entries"),
        ({"lr_schedule": "cosine"}, "one of 'constant', 'inverse-sqrt'"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override, fragment):
    with pytest.raises(ConfigError) as e:
        build_config(LangevinMixtureConfig, override)
    assert fragment in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)
    other = tmp_path / "c.yaml"
    other.write_text("lr: 3\n")
    with pytest.raises(ConfigError, match="expected a .toml file"):
        load_config_file(other)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    """Files written through the temporary-file-and-rename path are not left 0600."""
    import os
    import stat

    from implicit_diffusion.runio import _UMASK, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o666 & ~_UMASK
