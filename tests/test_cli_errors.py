"""The command line's last line of defence: no traceback ever reaches the terminal.

A bad input is exit 2 with one line; an unexpected exception is exit 1 with one line naming the
file its full traceback was written to (the run directory when one exists, else the temporary
directory); an empty ``--out`` and checkpoints under torchrun are refused before anything is
written.
"""

import tempfile

import pytest

from implicit_diffusion.cli import main
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import EXPERIMENTS

TINY = ["--set", "num_steps=4", "--set", "num_particles=20", "--set", "eval_every=2", "--no-progress"]


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_an_unexpected_error_in_a_run_is_one_line_and_its_traceback_is_kept_in_the_run_directory(
        tmp_path, capsys, monkeypatch):
    def broken(config, **kwargs):
        raise RuntimeError("deliberate fault\nwith a second line")

    monkeypatch.setattr(EXPERIMENTS["langevin-mixture"], "run", broken)
    out = tmp_path / "r"
    assert main(["run", "langevin-mixture", *TINY, "--out", str(out)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("implicit-diffusion: internal error: RuntimeError: deliberate fault with a second line")
    (saved,) = out.glob("traceback-*.txt")
    assert str(saved) in line
    text = saved.read_text()
    assert text.startswith("Traceback") and "in broken" in text and "deliberate fault" in text


def test_an_unexpected_error_before_the_run_directory_exists_goes_to_the_temporary_directory(
        tmp_path, capsys, monkeypatch):
    import implicit_diffusion.runtime.config as config

    def broken(*sources):
        raise ZeroDivisionError("deliberate")

    monkeypatch.setattr(config, "build_config", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "r"
    assert main(["run", "langevin-mixture", *TINY, "--out", str(out)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "ZeroDivisionError: deliberate" in line
    (saved,) = (tmp_path / "tmp").glob("traceback-*.txt")
    assert str(saved) in line and "ZeroDivisionError" in saved.read_text()
    assert not out.exists()


def test_a_bad_input_message_is_shortened_to_one_line(tmp_path, capsys, monkeypatch):
    def broken(config, **kwargs):
        raise ConfigError("x" * 100_000 + "\nsecond line")

    monkeypatch.setattr(EXPERIMENTS["langevin-mixture"], "run", broken)
    assert main(["run", "langevin-mixture", *TINY, "--out", str(tmp_path / "r")]) == 2
    line = _one_line(capsys.readouterr().err)
    assert len(line) < 2200 and "(100,012 characters)" in line


@pytest.mark.parametrize("command", [["run", "langevin-mixture", *TINY], ["report", "somewhere"]])
def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--out", ""]) == 2
    assert "--out must name a directory, got an empty string" in _one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # no runs/ written instead


def test_checkpoints_under_torchrun_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    from implicit_diffusion import distributed
    from implicit_diffusion.runtime import runner
    from implicit_diffusion.runtime.config import build_config

    experiment = EXPERIMENTS["langevin-mixture"]
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    config = build_config(experiment.Config, {"num_steps": 4, "num_particles": 20, "checkpoint_every": 10})
    with pytest.raises(ConfigError, match="'checkpoint_every' must be None under torchrun .* got 10"):
        runner.execute(experiment, config, tmp_path / "r", name="langevin-mixture")
    assert not (tmp_path / "r").exists()


def test_a_bad_input_found_once_the_run_began_leaves_no_run_directory(tmp_path, capsys):
    """A data file refused after the run directory was made (set-up only: run.json, config.toml, an
    empty metrics.jsonl) is removed again, so the same --out can be used at once; an existing empty
    directory given as --out is kept, emptied."""
    bad = tmp_path / "bad.npy"
    bad.write_text("not numpy")
    out = tmp_path / "r"
    assert main(["pretrain", "images", "--data", str(bad), "--no-progress", "--out", str(out)]) == 2
    assert "is not a .npy file" in _one_line(capsys.readouterr().err)
    assert not out.exists()
    out.mkdir()
    assert main(["pretrain", "images", "--data", str(bad), "--no-progress", "--out", str(out)]) == 2
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_run_that_recorded_something_keeps_its_directory_after_a_bad_input(tmp_path, capsys, monkeypatch):
    from implicit_diffusion.errors import DataError

    experiment = EXPERIMENTS["langevin-mixture"]

    def fails_after_recording(config, *, metrics_sink=None, **kwargs):
        metrics_sink([{"step": 0, "reward": 1.0}])
        raise DataError("deliberate, after a record")

    monkeypatch.setattr(experiment, "run", fails_after_recording)
    out = tmp_path / "r"
    assert main(["run", "langevin-mixture", *TINY, "--out", str(out)]) == 2
    assert (out / "metrics.jsonl").read_text().strip() == '{"step": 0, "reward": 1.0}'
    assert {"run.json", "config.toml"} <= {p.name for p in out.iterdir()}
