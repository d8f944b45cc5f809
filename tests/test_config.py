"""Config loading: TOML files, key=value overrides, validation errors naming key and allowed values."""

import pytest

from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments.langevin_mixture import LangevinMixtureConfig
from implicit_diffusion.runtime.config import build_config, config_to_toml, load_config_file, parse_overrides


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
    not_a_mapping = tmp_path / "list.toml"
    not_a_mapping.write_text("[[runs]]\nlr = 3\n")
    with pytest.raises(ConfigError, match="'runs'"):
        build_config(LangevinMixtureConfig, load_config_file(not_a_mapping))


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_atomic_writes_get_the_usual_file_permissions(tmp_path):
    """Files written through the temporary-file-and-rename path are not left 0600."""
    import os
    import stat

    from implicit_diffusion.serialization import _UMASK, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o666 & ~_UMASK


def test_yaml_and_toml_files_give_the_same_config(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('lr = 0.05\noptimizer = "adam"\ntheta0 = [1, 0, 1, 0, 1, 0]\ncompare = true\n')
    for name in ("c.yaml", "c.yml"):
        yml = tmp_path / name
        yml.write_text("lr: 0.05\noptimizer: adam\ntheta0: [1, 0, 1, 0, 1, 0]\ncompare: true\n")
        a = build_config(LangevinMixtureConfig, load_config_file(toml))
        b = build_config(LangevinMixtureConfig, load_config_file(yml))
        assert a == b and b.lr == 0.05 and b.optimizer == "adam" and b.compare is True


def test_yaml_goes_through_the_safe_loader(tmp_path):
    """A tag that would construct a Python object (here: call os.system) is refused, not run."""
    marker = tmp_path / "ran"
    f = tmp_path / "evil.yaml"
    f.write_text(f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(f)
    assert not marker.exists()


@pytest.mark.parametrize("text, fragment", [
    ("- 1\n- 2\n", "flat mapping"),
    ("lr: [0.1\n", "not valid YAML"),
    ("lr: abc\n", None),  # parses; build_config names the key
])
def test_bad_yaml_files_name_the_problem(tmp_path, text, fragment):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    if fragment is not None:
        with pytest.raises(ConfigError, match=fragment):
            load_config_file(f)
    else:
        with pytest.raises(ConfigError, match="'lr'"):
            build_config(LangevinMixtureConfig, load_config_file(f))


def test_an_empty_yaml_file_is_the_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# nothing set\n")
    assert build_config(LangevinMixtureConfig, load_config_file(f)) == LangevinMixtureConfig()


def test_other_suffixes_are_refused(tmp_path):
    f = tmp_path / "c.json"
    f.write_text("{}")
    with pytest.raises(ConfigError, match=r"\.toml, \.yaml, \.yml"):
        load_config_file(f)


def test_optional_settings_left_unset_round_trip(tmp_path):
    """TOML has no null: an unset optional key is omitted from config.toml and reads back as None."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class WithOptional:
        lr: float = 0.1
        data: str | None = None

    for c in (WithOptional(), WithOptional(data="x.npz")):
        f = tmp_path / "config.toml"
        f.write_text(config_to_toml(c))
        assert "null" not in f.read_text()
        assert build_config(WithOptional, load_config_file(f)) == c
