"""Hostile settings: values, files and sizes that used to crash, hang or train the wrong way are
refused in one line (ConfigError; exit 2 on the command line) before anything is written."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import torch

from implicit_diffusion.cli import main
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import EXPERIMENTS, pretrain
from implicit_diffusion.experiments.ebm import EBMConfig
from implicit_diffusion.experiments.langevin_mixture import LangevinMixtureConfig
from implicit_diffusion.runtime import memory
from implicit_diffusion.runtime.config import MAX_FILE_BYTES, build_config, load_config_file, parse_overrides
from implicit_diffusion.runtime.validation import FLOAT_MAX, cpu_count, short

CONFIGS = {name: module.Config for name, module in EXPERIMENTS.items()}
CONFIGS["pretrain"] = pretrain.Config


def _fields(cls, kind):
    """(name, is_list) of the fields of ``cls`` holding ``kind`` (float or int), alone or in a tuple."""
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        if get_origin(tp) is Literal:
            continue
        if tp is kind:
            out.append((name, False))
        elif get_origin(tp) is tuple and get_args(tp)[0] is kind:
            out.append((name, True))
    return out


def _cli(capsys, tmp_path, *argv):
    out = tmp_path / "r"
    rc = main([*argv, "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("implicit-diffusion: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()
    return err


# --- 1. values ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [-1.0, 0.0])
def test_pretrain_max_grad_norm_must_be_positive(capsys, tmp_path, value):
    with pytest.raises(ConfigError, match=r"'max_grad_norm' must be > 0"):
        build_config(pretrain.Config, {"max_grad_norm": value})
    assert build_config(pretrain.Config, {"max_grad_norm": 0.5}).max_grad_norm == 0.5
    err = _cli(capsys, tmp_path, "pretrain", "digits", "--set", f"max_grad_norm={value}")
    assert "'max_grad_norm' must be > 0" in err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_float_field_refuses_nan_inf_and_overflowing_values(name):
    cls = CONFIGS[name]
    fields = _fields(cls, float)
    assert fields, name
    for key, is_list in fields:
        for bad in (float("nan"), float("inf"), -float("inf"), 1e300, 10**400):
            value = [bad] if is_list else bad
            with pytest.raises(ConfigError, match=f"'{key}'") as e:
                build_config(cls, {key: value})
            assert "finite number" in str(e.value), (key, str(e.value))
            with pytest.raises(ConfigError, match=f"'{key}'"):  # from Python too (__post_init__)
                cls(**{key: tuple(value) if is_list else bad})


def test_the_float_bound_is_float32s_largest_where_torch_overflows():
    assert FLOAT_MAX == torch.finfo(torch.float32).max
    p = torch.zeros(2)
    p.add_(torch.ones(2), alpha=-FLOAT_MAX)  # the largest allowed lr·(factor 1) works on float32 …
    with pytest.raises(RuntimeError, match="overflow"):
        p.add_(torch.ones(2), alpha=-1e300)  # … what lr = 1e300 did inside SGD
    assert build_config(LangevinMixtureConfig, {"lr": 1e38}).lr == 1e38
    with pytest.raises(ConfigError, match=r"'lr' must be a finite number of magnitude at most 3.4028e38"):
        build_config(LangevinMixtureConfig, parse_overrides(["lr=1e300"]))


def test_kl_weight_nan_is_refused_before_the_run_directory(capsys, tmp_path):
    err = _cli(capsys, tmp_path, "run", "diffusion-finetune", "--set", "kl_weight=nan")
    assert "'kl_weight'" in err and "nan" in err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_int_field_is_bounded_to_int64(name):
    cls = CONFIGS[name]
    for key, is_list in _fields(cls, int):
        for bad in (2**63, -(2**63), 99999999999999999999, 10**5000):
            with pytest.raises(ConfigError, match=f"'{key}'"):
                build_config(cls, {key: [bad] if is_list else bad})


def test_seed_is_in_0_to_2_63():
    for bad in (-1, 2**63, 2**64):
        with pytest.raises(ConfigError, match=r"'seed' must be an integer in \[0, 2\*\*63\)"):
            build_config(LangevinMixtureConfig, {"seed": bad})
    assert build_config(LangevinMixtureConfig, {"seed": 2**63 - 1}).seed == 2**63 - 1
    torch.Generator().manual_seed(2**63 - 1 + 1000 + 10**6)  # the largest seed plus the offsets runs add


def test_num_threads_is_bounded_by_the_machine():
    allowed = rf"None \(automatic\) or an integer in \[1, {cpu_count()}\]"
    with pytest.raises(ConfigError, match=rf"'num_threads' must be {allowed}"):
        build_config(EBMConfig, parse_overrides(["num_threads=100000"]))
    with pytest.raises(ConfigError, match="'num_threads'"):
        build_config(EBMConfig, {"num_threads": cpu_count() + 1})
    assert build_config(EBMConfig, {"num_threads": cpu_count()}).num_threads == cpu_count()
    assert build_config(EBMConfig, {}).num_threads is None  # automatic
    assert build_config(EBMConfig, parse_overrides(["num_threads=None"])).num_threads is None
    with pytest.raises(ConfigError, match=r"'num_threads' must be None \(automatic\) or an integer in \[1, .*got 0"):
        build_config(EBMConfig, {"num_threads": 0})  # the former sentinel for "automatic" is refused


def test_huge_integers_on_the_command_line_stop_before_the_run_directory(capsys, tmp_path):
    err = _cli(capsys, tmp_path, "run", "langevin-mixture", "--set", "num_steps=99999999999999999999")
    assert "'num_steps'" in err and "2**63" in err
    err = _cli(capsys, tmp_path, "run", "langevin-mixture", "--seed", str(2**64))
    assert "'seed'" in err
    err = _cli(capsys, tmp_path, "run", "langevin-mixture", "--set", "num_threads=100000")
    assert "'num_threads'" in err


@pytest.mark.parametrize("base_channels", [4, 8, 12, 16, 24])
def test_pretrain_base_channels_follow_the_unets_groupnorm(base_channels):
    from implicit_diffusion.models.unet import UNet

    try:
        UNet(1, base_channels, (1, 2, 2))
        unet_ok = True
    except ValueError:
        unet_ok = False
    if unet_ok:
        assert build_config(pretrain.Config, {"base_channels": base_channels}).base_channels == base_channels
    else:
        with pytest.raises(ConfigError, match=r"'base_channels' must be a multiple of 8 \(the U-Net's GroupNorm"):
            build_config(pretrain.Config, {"base_channels": base_channels})
    # points are modelled by an MLP: no constraint
    assert build_config(pretrain.Config, {"dataset": "moons", "base_channels": 4}).base_channels == 4
    assert unet_ok == (base_channels % 8 == 0)


def test_pretrain_channel_mults_must_fit_the_image_size():
    with pytest.raises(ConfigError, match="divisible by 16; digits images are 8×8"):
        build_config(pretrain.Config, {"channel_mults": [1, 2, 2, 2, 2]})
    assert build_config(pretrain.Config, {"channel_mults": [1, 2, 2, 2]}).channel_mults == (1, 2, 2, 2)


# --- 2. files and overrides -------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, text", [
    (".toml", "theta0 = " + "[" * 5000 + "]" * 5000 + "\n"),
    (".toml", "theta0 = " + "[" * 20 + "]" * 20 + "\n"),
    (".yaml", "theta0: " + "[" * 5000 + "]" * 5000 + "\n"),
    (".yaml", "".join(" " * i + "-\n" for i in range(300))),
])
def test_deeply_nested_files_are_refused(tmp_path, suffix, text):
    f = tmp_path / f"c{suffix}"
    f.write_text(text)
    with pytest.raises(ConfigError, match="nested more than 8 levels deep"):
        load_config_file(f)


def test_deeply_nested_overrides_are_refused(capsys, tmp_path):
    with pytest.raises(ConfigError, match="nested more than 8 levels deep"):
        parse_overrides(["theta0=" + "[" * 30000 + "]" * 30000])
    err = _cli(capsys, tmp_path, "run", "langevin-mixture", "--set", "theta0=" + "[" * 30000 + "]" * 30000)
    assert "nested" in err and len(err) < 400


@pytest.mark.parametrize("suffix, sep", [(".yaml", ": "), (".toml", " = ")])
def test_integers_past_pythons_conversion_limit_are_refused(tmp_path, suffix, sep):
    f = tmp_path / f"c{suffix}"
    f.write_text(f"seed{sep}{'1' * 5000}\n")
    with pytest.raises(ConfigError, match="integer") as e:
        load_config_file(f)
    assert len(str(e.value)) < 400
    with pytest.raises(ConfigError, match="integer"):
        parse_overrides(["seed=" + "1" * 5000])
    f.write_text(f"seed{sep}{'1' * 100}\n")  # readable, then out of range: the key is named
    with pytest.raises(ConfigError, match=r"'seed' must be an integer in \[0, 2\*\*63\), got an integer of about"):
        build_config(LangevinMixtureConfig, load_config_file(f))


@pytest.mark.parametrize("text", [
    "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)),
    "lr: &x 0.1\nstep_size: *x\n",
])
def test_yaml_aliases_and_anchors_are_refused(tmp_path, text):
    f = tmp_path / "bomb.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="aliases and anchors"):
        load_config_file(f)


def test_large_files_are_refused_without_being_read(tmp_path):
    f = tmp_path / "big.yaml"
    with open(f, "wb") as fh:  # 100 MB, sparse: no disk used
        fh.truncate(100_000_000)
    with pytest.raises(ConfigError, match=r"has 100,000,000 bytes; a settings file may have at most 1,000,000"):
        load_config_file(f)
    f.write_text("lr: 0.1\n" + "#" * (MAX_FILE_BYTES - 9) + "\n")  # exactly the bound: read
    assert load_config_file(f) == {"lr": 0.1}


@pytest.mark.parametrize("text", ["lr: 2001-13-45\n", "lr: !!int abc\n", "lr: !!float abc\n"])
def test_yaml_scalars_no_constructor_can_build_are_config_errors(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match="is not valid YAML: ValueError"):
        load_config_file(f)


def test_duplicate_yaml_keys_are_refused_like_toml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\nnum_steps: 3\nlr: 0.2\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config_file(f)
    t = tmp_path / "c.toml"
    t.write_text("lr = 0.1\nlr = 0.2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(t)


def test_huge_values_are_shortened_in_messages(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("reward: " + "x" * 200_000 + "\n")
    with pytest.raises(ConfigError) as e:
        build_config(LangevinMixtureConfig, load_config_file(f))
    # the value is shortened; the setting's help follows in brackets, at most 400 characters of it
    message, _, help_text = str(e.value).partition(" [reward: ")
    assert "'reward'" in message and "(200,002 characters)" in message and len(message) < 200
    assert help_text.startswith("the reward") and len(help_text) <= 401
    f.write_text("device: " + "x" * 200_000 + "\n")  # a free string: bounded in length
    with pytest.raises(ConfigError, match="'device' must be a string of at most 4,096 characters") as e:
        build_config(LangevinMixtureConfig, load_config_file(f))
    assert len(str(e.value)) < 200 + 400 and " [device: where the run computes" in str(e.value)
    err = _cli(capsys, tmp_path, "run", "langevin-mixture", "--config", str(f))
    assert len(err) < 300 + 400


def test_short_never_fails_and_keeps_small_values_exact():
    assert short(0.1) == "0.1" and short("adam") == "'adam'" and short(float("nan")) == "nan"
    assert short(10**5000) == "an integer of about 5,001 digits"
    assert short(-(10**5000)).startswith("-an integer of about")
    long = short("y" * 10**6)
    assert long.startswith("'yyy") and long.endswith("… (1,000,002 characters)") and len(long) < 100
    assert short([10**5000]) == "a list"  # its repr raises (Python will not print the int): described


# --- 3. memory -------------------------------------------------------------------------------------

HOSTILE = [
    ("langevin-mixture", {"num_particles": 4_000_000_000}, "num_particles = 4,000,000,000"),
    ("ebm", {"num_particles": 4_000_000_000}, "num_particles = 4,000,000,000"),
    ("rates", {"num_particles": 4_000_000_000}, "num_particles = 4,000,000,000"),
    ("ebm", {"batch_size": 100_000_000}, "batch_size = 100,000,000"),
    ("ebm", {"num_heldout": 100_000_000}, "num_heldout = 100,000,000"),
    ("pretrain", {"dataset": "moons", "num_points": 10_000_000_000}, "num_points = 10,000,000,000"),
    ("diffusion-finetune", {"eval_samples": 1_000_000_000}, "eval_samples = 1,000,000,000"),
    ("diffusion-finetune", {"batch_size": 100_000_000}, "batch_size = 100,000,000"),
    ("diffusion-gaussian-1d", {"batch_size": 100_000_000}, "batch_size = 100,000,000"),
    ("hyperparameter", {"num_updates": 10**12}, "num_updates = 1,000,000,000,000"),
    ("rates", {"num_steps": 10**12}, "num_steps = 1,000,000,000,000"),
]


@pytest.mark.parametrize("name, values, named", HOSTILE)
def test_what_cannot_fit_is_refused_naming_the_setting(monkeypatch, name, values, named):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 16 * 10**9)
    config = build_config(CONFIGS[name], {"device": "cpu"}, values)
    with pytest.raises(ConfigError, match="needs about .* of memory.*this machine has 16 GB available") as e:
        memory.check_config(config)
    assert named in str(e.value) and len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_defaults_fit_and_the_estimate_grows_with_the_sizes(monkeypatch, name):
    config = CONFIGS[name]()
    memory.check_config(config, "cpu")  # the real available memory
    estimate = config.memory_estimate()
    assert estimate and all(isinstance(n, int) and n >= 0 for n in estimate.values())
    assert 0 < sum(estimate.values()) < 10**9  # the defaults are small runs
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": sum(estimate.values()) - 1)
    with pytest.raises(ConfigError, match="needs about"):  # one byte short of the estimate: refused
        memory.check_config(config, "cpu")


def test_a_particle_estimate_counts_at_least_the_particles():
    for n in (1000, 10**6):
        for dtype, b in (("float32", 4), ("float64", 8)):
            est = LangevinMixtureConfig(num_particles=n, dtype=dtype).memory_estimate()
            assert max(est.values()) >= n * 2 * b


def test_the_cli_refuses_a_run_that_cannot_fit_before_writing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1_000_000)
    err = _cli(capsys, tmp_path, "run", "langevin-mixture", "--device", "cpu", "--set", "num_particles=100000")
    assert "num_particles = 100,000" in err and "1 MB available" in err
    err = _cli(capsys, tmp_path, "pretrain", "moons", "--device", "cpu", "--set", "num_points=1000000")
    assert "num_points = 1,000,000" in err


def test_resume_refuses_a_run_that_cannot_fit(monkeypatch, capsys, tmp_path):
    module = EXPERIMENTS["langevin-mixture"]
    monkeypatch.setattr(module, "save", lambda result, run_dir: [])  # no figures, no summary.json: resumable
    out = tmp_path / "run"
    args = ["run", "langevin-mixture", "--device", "cpu", "--no-progress", "--out", str(out), "--checkpoint-every", "1",
            "--set", "num_particles=20", "--set", "num_steps=2", "--set", "eval_every=1", "--set", "snapshot_steps=[0]"]
    assert main(args) == 0 and (out / "checkpoint.safetensors").exists()
    capsys.readouterr()
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 100)
    assert main(["resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "num_particles = 20" in err and "100 bytes available" in err and len(err.strip().splitlines()) == 1
    assert not (out / "summary.json").exists()


def test_available_bytes_of_the_host_is_plausible():
    n = memory.available_bytes("cpu")
    assert isinstance(n, int) and 0 < n
    total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert n <= total
    assert memory.format_bytes(6.4e10) == "64 GB" and memory.format_bytes(512) == "512 bytes"


def test_a_cuda_device_is_checked_against_its_free_memory_and_shards_divide_it(monkeypatch):
    """No GPU needed: torch.cuda.mem_get_info is replaced by a GPU with 5 GB free."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * 10**9, 80 * 10**9))
    assert memory.available_bytes("cuda:0") == 5 * 10**9
    # 8 GB of particles and their temporaries in float32, 0.8 GB for the one snapshot: 8.8 GB in all
    config = LangevinMixtureConfig(num_particles=100_000_000, snapshot_steps=(0,))
    with pytest.raises(ConfigError, match=r"num_particles = 100,000,000 .* needs about 8 GB .* 5 GB available \(cuda"):
        memory.check_config(config, "cuda:0")
    memory.check_config(config, "cuda:0", shards=2)  # torchrun over 2 GPUs: 4.4 GB each
    with pytest.raises(ConfigError, match="8.8 GB in all"):
        memory.check_config(config, "cuda:0", shards=1)
    assert memory.available_bytes("meta") is None  # a device whose memory cannot be told: not checked
    memory.check_config(config, "meta")
