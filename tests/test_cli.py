"""The command line: a tiny end-to-end run, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from implicit_diffusion.cli import main

TINY = ["--set", "num_steps=60", "--set", "num_particles=200", "--set", "eval_every=20", "--no-progress"]


def test_tiny_run_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "langevin-mixture", *TINY, "--seed", "3", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.toml", "metrics.jsonl", "theta.safetensors", "summary.json",
            "particles.png", "reward.png", "weights.png"} <= names
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [r for r in records if "reward" in r]
    evals = [r for r in records if "exact_reward" in r]
    assert [r["step"] for r in per_step] == list(range(60))
    assert [r["step"] for r in evals] == [0, 20, 40, 60]
    assert all(abs(sum(r["weights"]) - 1) < 1e-6 for r in evals)
    assert load_file(out / "theta.safetensors")["theta"].shape == (6,)
    assert "seed = 3" in (out / "config.toml").read_text()
    printed = capsys.readouterr().out
    assert "final weights" in printed and "wall time" in printed


def test_compare_adds_the_baselines(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "langevin-mixture", *TINY, "--set", "compare=true", "--set", "nested_inner_steps=[10]",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "nested T=10" in printed and "R_s" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "optimizer=adagrad"], "'optimizer': expected one of 'sgd', 'adam'"),
        (["--set", "nope=1"], "unknown config key 'nope'"),
        (["--set", "num_particles=-5"], "'num_particles' must be > 0"),
        (["--config", "/nonexistent/c.toml"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main(["run", "langevin-mixture", *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing written for a rejected config


def test_refuses_a_non_empty_output_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("precious")
    assert main(["run", "langevin-mixture", *TINY, "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_console_entry_point_as_a_process(tmp_path):
    """``python -m implicit_diffusion`` runs, and a bad value exits 2 without a traceback."""
    r = subprocess.run([sys.executable, "-m", "implicit_diffusion", "run", "langevin-mixture",
                        "--set", "lr_schedule=cosine"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "inverse-sqrt" in r.stderr


def test_list_shows_every_experiment_and_pretrain(capsys):
    from implicit_diffusion.experiments import EXPERIMENTS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"run {name}" in out for name in EXPERIMENTS)
    assert "pretrain DATASET" in out
    assert main(["list", "diffusion-finetune"]) == 0
    assert "  reward_weight = 30.0" in capsys.readouterr().out
