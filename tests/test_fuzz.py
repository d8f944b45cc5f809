"""Fuzzing (hypothesis) the surfaces users touch: bad configs and CLI arguments must end in the
project's one-line error with exit code 2; bad user callables in the documented exceptions
naming the function; damaged checkpoint bytes, fuzzed checkpoint records and model files in
DataError; hostile values in any field of any experiment in a ConfigError or a config that writes
valid TOML. Derandomized so CI is reproducible."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import keyword
import typing
from pathlib import Path
from typing import Literal, get_args, get_origin

import pytest
import torch
from conftest import crash_at
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from implicit_diffusion import FunctionPotential, RewardEstimator
from implicit_diffusion.cli import main
from implicit_diffusion.errors import ConfigError, DataError, UserFunctionError
from implicit_diffusion.experiments import EXPERIMENTS, pretrain
from implicit_diffusion.runtime.checkpoints import load_checkpoint, save_checkpoint
from implicit_diffusion.runtime.config import build_config, parse_overrides

FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

CONFIGS = {name: module.Config for name, module in EXPERIMENTS.items()}
CONFIGS["pretrain"] = pretrain.Config


def _toml(value) -> str:
    """A TOML literal for ``value`` (what a user would type after ``--set key=``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


words = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_", min_size=1, max_size=12)
fractional = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).filter(
    lambda v: v != int(v))


def bad_value(tp):
    """Values of the wrong type (or outside the allowed set) for a field of type ``tp``."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        return words.filter(lambda w: w not in allowed) | st.integers(-5, 5) | st.booleans()
    if origin is tuple:
        return words | st.lists(words, min_size=1, max_size=3) | st.booleans()
    if tp is bool:
        return st.integers(-5, 5) | words.filter(lambda w: w not in ("true", "false")) | fractional
    if tp is int:
        return fractional | words | st.booleans() | st.lists(st.integers(), min_size=1, max_size=2)
    if tp is float:
        return words | st.booleans() | st.lists(st.floats(allow_nan=False), min_size=1, max_size=2)
    return st.nothing()


@st.composite
def bad_override(draw):
    """(command, one bad ``key=value``): an unknown key, or a known key with a bad value."""
    name = draw(st.sampled_from(sorted(CONFIGS)))
    cls = CONFIGS[name]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if bad_value(hints[f.name]) is not st.nothing()]
    if draw(st.booleans()):
        key = draw(words.filter(lambda w: w not in hints and w.isidentifier() and not keyword.iskeyword(w)))
        value = draw(st.integers())
    else:
        key = draw(st.sampled_from(fields))
        value = draw(bad_value(hints[key]))
    return name, f"{key}={_toml(value)}"


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
    return rc, err.getvalue()


@FUZZ
@given(bad_override())
def test_bad_overrides_are_config_errors_and_exit_2(tmp_path, case):
    name, override = case
    cls = CONFIGS[name]
    with pytest.raises(ConfigError):  # the API: the documented exception
        build_config(cls, parse_overrides([override]))
    argv = ["pretrain", "digits"] if name == "pretrain" else ["run", name]
    rc, err = _cli([*argv, "--set", override, "--no-progress", "--out", str(tmp_path / "never-written")])
    assert rc == 2
    assert err.startswith("implicit-diffusion: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "never-written").exists()


@FUZZ
@given(st.lists(st.sampled_from(["--seed", "--checkpoint-every", "--set", "--config", "--out", "--bogus", "x", "1.5",
                                 "-3", "=", "lr=", "=1", "--no-progress", "--data"]), min_size=1, max_size=5),
       st.sampled_from(["run nonexistent", "run langevin-mixture", "pretrain nowhere", "resume", "report"]))
def test_garbled_command_lines_exit_2_without_a_traceback(tmp_path, tokens, command):
    argv = command.split() + tokens
    assume(not (command == "run langevin-mixture" and "--set" not in tokens and "--config" not in tokens
                and "--seed" not in tokens and "--checkpoint-every" not in tokens and "--bogus" not in tokens
                and "x" not in tokens and "1.5" not in tokens and "-3" not in tokens and "=" not in tokens
                and "lr=" not in tokens and "=1" not in tokens and "--data" not in tokens))  # would really run
    with contextlib.chdir(tmp_path):
        rc, err = _cli(argv)
    assert rc == 2, (argv, err)
    assert "Traceback" not in err


@FUZZ
@given(st.text(max_size=200), st.sampled_from([".toml", ".yaml"]))
def test_config_files_of_any_text_load_or_raise_config_error(tmp_path, text, suffix):
    from implicit_diffusion.runtime.config import load_config_file

    f = tmp_path / f"c{suffix}"
    f.write_text(text, encoding="utf-8")
    try:
        build_config(CONFIGS["langevin-mixture"], load_config_file(f))
    except ConfigError:
        pass



hostile_scalars = (st.integers() | st.integers(min_value=2**62, max_value=2**80) | st.floats()
                   | st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, 10**400, 2**64])
                   | st.text(max_size=30) | st.booleans() | st.none())
hostile_values = st.recursive(hostile_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=12)


@FUZZ
@given(st.sampled_from(sorted(CONFIGS)), st.data())
def test_hostile_values_in_any_field_are_config_errors_or_configs_that_write_valid_toml(tmp_path, name, data):
    """Values of any type and size (NaN, ±inf, 1e300, integers past int64 and past Python's
    4,300-digit printing limit, nested lists, None) in any field of any experiment, from a YAML
    file and from ``--set``: either a one-line ConfigError, or a config whose written
    ``config.toml`` reads back to the same config (the file a resume reads)."""
    import yaml

    from implicit_diffusion.runtime.config import config_to_toml, load_config_file

    cls = CONFIGS[name]
    key = data.draw(st.sampled_from([f.name for f in dataclasses.fields(cls)]))
    value = data.draw(hostile_values)

    def one_line(e: ConfigError) -> bool:
        return "\n" not in str(e) and len(str(e)) < 2_000

    sources = []
    try:
        sources.append(parse_overrides([f"{key}={_toml(value)}"]))
    except ValueError:  # no TOML literal here: None, or an integer too long for repr
        pass
    except ConfigError as e:
        assert one_line(e)
    (tmp_path / "hostile.yaml").write_text(yaml.safe_dump({key: value}), encoding="utf-8")
    try:
        sources.append(load_config_file(tmp_path / "hostile.yaml"))
    except ConfigError as e:
        assert one_line(e)
    for source in sources:
        try:
            config = build_config(cls, source)
        except ConfigError as e:
            assert one_line(e), str(e)[:200]
            continue
        (tmp_path / "config.toml").write_text(config_to_toml(config))
        assert build_config(cls, load_config_file(tmp_path / "config.toml")) == config

# --- user callables ---------------------------------------------------------------------------

def _bad_output(kind: str, x: torch.Tensor, shape_seed: int):
    n, d = x.shape
    if kind == "shape":
        return torch.zeros([(n, 1), (n + 1,), (1,), (), (n, d)][shape_seed % 5])
    if kind == "dtype":
        return torch.zeros(n, dtype=torch.float64)
    if kind == "nan":
        out = torch.zeros(n)
        out[shape_seed % n] = float("nan") if shape_seed % 2 else float("inf")
        return out
    if kind == "type":
        return [0.0] * n
    raise RuntimeError(f"user bug {shape_seed}")


@FUZZ
@given(st.sampled_from(["shape", "dtype", "nan", "type", "raise"]), st.integers(0, 1000), st.integers(2, 9))
def test_bad_rewards_raise_the_documented_errors_naming_the_function(kind, seed, n):
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))

    def user_reward(x):
        return _bad_output(kind, x, seed)

    V = FunctionPotential(lambda x, th: ((x - th) ** 2).sum(-1), torch.zeros(2))
    with pytest.raises((ValueError, TypeError, UserFunctionError), match="reward_fn user_reward"):
        RewardEstimator(user_reward)(V, x)


@FUZZ
@given(st.sampled_from(["shape", "dtype", "nan", "type", "raise"]), st.integers(0, 1000))
def test_bad_score_models_raise_the_documented_errors_naming_the_function(kind, seed):
    from implicit_diffusion.samplers import VPSchedule, euler_maruyama_step

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))

    def user_model(x, t):
        if kind == "shape":
            return torch.zeros(x.shape[0], x.shape[1] + 1 + seed % 3)
        if kind == "nan":
            out = torch.zeros_like(x)
            out[seed % 4, seed % 3] = float("nan")
            return out
        if kind == "dtype":
            return x.double()
        if kind == "type":
            return x.tolist()
        raise ZeroDivisionError("oops")

    with pytest.raises((ValueError, TypeError, UserFunctionError), match="model user_model"):
        euler_maruyama_step(x, user_model, 0, schedule=VPSchedule("ou", num_steps=3), noise=torch.zeros_like(x))


@FUZZ
@given(st.data())
def test_damaged_checkpoints_load_or_raise_data_error(tmp_path, data):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"x": torch.arange(50.0), "g": torch.Generator().manual_seed(1).get_state()},
                    {"step": 3, "nested": {"a": [1, 2]}})
    raw = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "garbage"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            raw[i] ^= data.draw(st.integers(1, 255))
    else:
        raw = bytearray(data.draw(st.binary(max_size=300)))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    try:
        tensors, meta = load_checkpoint(damaged)
    except DataError as e:
        assert str(damaged) in str(e) and "\n" not in str(e)
    else:  # a flip inside tensor data is not detectable (no checksum): the file still parses
        assert isinstance(meta, dict) and set(tensors) <= {"x", "g"}


_CHECKPOINT_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 60) | st.floats(-10, 10, allow_nan=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5)
_DTYPES = [torch.float32, torch.float64, torch.int64, torch.uint8, torch.bfloat16, torch.bool]


@pytest.fixture(scope="module")
def crashed_run(tmp_path_factory):
    """A langevin-mixture run (Adam, inverse-sqrt schedule) crashed at update 15; its checkpoint is at 10."""
    from implicit_diffusion.experiments import langevin_mixture
    from implicit_diffusion.runtime import recording
    from implicit_diffusion.runtime.runner import execute

    run_dir = tmp_path_factory.mktemp("fuzz-resume") / "run"
    cfg = langevin_mixture.Config(num_particles=8, num_steps=20, eval_every=5, snapshot_steps=(0,), progress=False,
                                  checkpoint_every=10, optimizer="adam", lr_schedule="inverse-sqrt")
    with crash_at(recording.EvalRecorder, "record", 15), pytest.raises(RuntimeError, match="simulated crash"):
        execute(langevin_mixture, cfg, run_dir, name="langevin-mixture")
    return run_dir


def _fuzz_meta(meta, data) -> None:
    """Replace (or delete) one value somewhere in the checkpoint's record."""
    node, key = meta, None
    while True:
        keys = list(range(len(node))) if isinstance(node, list) else sorted(node, key=str)
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, (dict, list)) or not child or data.draw(st.booleans()):
            break
        node = child
    if key is None:
        return
    if isinstance(node, dict) and data.draw(st.booleans()):
        del node[key]
    else:
        node[key] = data.draw(_CHECKPOINT_JSON)


def _fuzz_tensor(tensors: dict, data) -> None:
    """Drop, add, reshape or retype one tensor (valid safetensors framing all the same)."""
    how = data.draw(st.sampled_from(["drop", "add", "shape", "reshape", "dtype"]))
    name = data.draw(st.sampled_from(sorted(tensors)))
    if how == "drop":
        del tensors[name]
    elif how == "add":
        tensors[data.draw(st.sampled_from([name + ".x", "extra", "optimizer.0.max_exp_avg_sq", "sampler.dual"]))] = \
            torch.zeros(data.draw(st.integers(0, 6)))
    elif how == "shape":
        shape = data.draw(st.lists(st.integers(0, 6), max_size=3))
        tensors[name] = torch.zeros(shape, dtype=data.draw(st.sampled_from(_DTYPES)))
    elif how == "reshape":  # the same numbers in another shape
        tensors[name] = tensors[name].reshape(-1) if tensors[name].ndim != 1 else tensors[name].unsqueeze(0)
    else:
        tensors[name] = tensors[name].to(data.draw(st.sampled_from(_DTYPES)))


@FUZZ
@given(st.data())
def test_checkpoints_with_fuzzed_records_and_tensors_resume_or_raise_data_error(tmp_path, crashed_run, data):
    """Valid framing (format and version right) around a fuzzed record (values replaced or deleted
    anywhere, or the JSON text itself garbled) and fuzzed tensors (dropped, added, of other shapes or
    dtypes): ``resume`` finishes the run, or raises a one-line DataError / RunDirError, never another
    exception."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from implicit_diffusion.errors import RunDirError
    from implicit_diffusion.runtime.checkpoints import CHECKPOINT_FILE, CHECKPOINT_FORMAT
    from implicit_diffusion.runtime.runner import resume

    run_dir = Path(tempfile.mkdtemp(dir=tmp_path)) / "run"
    shutil.copytree(crashed_run, run_dir)
    path = run_dir / CHECKPOINT_FILE
    tensors, meta = load_checkpoint(path)
    for _ in range(data.draw(st.integers(1, 3))):
        part = data.draw(st.sampled_from(["meta", "meta", "tensor", "json-text"]))
        if part == "meta":
            _fuzz_meta(meta, data)
        elif part == "tensor" and tensors:
            _fuzz_tensor(tensors, data)
    text = json.dumps(meta)
    if data.draw(st.integers(0, 4)) == 0:  # the JSON text itself: cut, or replaced
        text = data.draw(st.sampled_from([text[: data.draw(st.integers(0, len(text)))], data.draw(st.text())]))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": CHECKPOINT_FORMAT, "version": "3", "meta": text})
    try:
        resume(run_dir, EXPERIMENTS)
    except (DataError, RunDirError) as e:
        assert "\n" not in str(e), str(e)


# --- model files ------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3),
                           max_leaves=6)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_model_files_with_fuzzed_metadata_load_or_raise_data_error(tmp_path, data):
    """Valid safetensors framing around fuzzed metadata (the architecture JSON, its keys and values, the
    class, schedule and extra) and tensors (dropped, renamed, reshaped, retyped): the file loads, or
    the error is a one-line DataError naming it; never another exception, never a huge allocation."""
    from safetensors.torch import save_file

    from implicit_diffusion.models import ScoreMLP, UNet
    from implicit_diffusion.models.io import FORMAT, load_score_model

    model = data.draw(st.sampled_from([ScoreMLP(2, hidden=4, depth=1, time_dim=4),
                                       UNet(1, 4, (1, 2), groups=2, time_dim=4)]))
    config, state = dict(model.config), dict(model.state_dict())
    meta = {"format": FORMAT, "version": "1", "class": type(model).__name__, "schedule": '{"kind": "linear"}',
            "extra": '{"data_shape": [2]}' if isinstance(model, ScoreMLP) else '{"data_shape": [1, 8, 8]}'}
    for _ in range(data.draw(st.integers(1, 3))):
        how = data.draw(st.sampled_from(["value", "size", "drop-key", "class", "text", "json", "tensor"]))
        if how in ("value", "size", "drop-key") and not isinstance(config, dict):
            continue  # already replaced by text or another JSON value
        if how in ("value", "size"):  # one key of the architecture, any JSON value or a well-typed extreme
            key = data.draw(st.sampled_from([*config, "bogus"]))
            config[key] = data.draw(json_values if how == "value" else st.integers(-2, 2**40))
        elif how == "drop-key" and config:
            config.pop(data.draw(st.sampled_from(sorted(config))))
        elif how == "class":
            meta["class"] = data.draw(st.sampled_from(["ScoreMLP", "UNet"]) | st.text(max_size=8))
        elif how in ("text", "json"):  # a whole metadata entry replaced
            key = data.draw(st.sampled_from(["config", "schedule", "extra"]))
            value = data.draw(st.text(max_size=30)) if how == "text" else json.dumps(data.draw(json_values))
            if key == "config":
                config = value
            else:
                meta[key] = value
        else:  # a tensor dropped, renamed or of another shape / dtype
            name = data.draw(st.sampled_from(sorted(state)))
            tensor = state.pop(name)
            change = data.draw(st.sampled_from(["drop", "rename", "reshape", "dtype"]))
            if change == "rename":
                state[name + "_"] = tensor
            elif change == "reshape":
                state[name] = torch.zeros(data.draw(st.lists(st.integers(0, 6), max_size=3)))
            elif change == "dtype":
                state[name] = tensor.to(data.draw(st.sampled_from([torch.int64, torch.bool, torch.float16])))
    meta["config"] = config if isinstance(config, str) else json.dumps(config)
    path = tmp_path / "fuzzed.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=meta)
    try:
        loaded = load_score_model(path)
    except DataError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
    else:
        assert type(loaded.model).__name__ == meta["class"] and not loaded.model.training
