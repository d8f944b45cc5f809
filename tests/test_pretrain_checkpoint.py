"""``pretrain``: a crash and a resume give the uninterrupted run's outputs bit for bit; a learning rate
far too large stops the run at the first non-finite update, keeping a finite checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import crash_at, same_tensors
from safetensors import safe_open
from safetensors.torch import load_file

from implicit_diffusion.cli import main
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import EXPERIMENTS, pretrain
from implicit_diffusion.runtime.checkpoints import load_checkpoint, save_checkpoint
from implicit_diffusion.runtime.runner import execute, resume

# 60 Adam steps, checkpoints after steps 20 and 40 (and 60)
TINY = dict(dataset="moons", num_points=500, num_steps=60, batch_size=32, hidden=16, sampling_steps=10,
            progress=False, checkpoint_every=20)
JOBS = {**EXPERIMENTS, "pretrain": pretrain}  # the CLI's ``resume`` must look pretrain up too


def _outputs(run_dir: Path) -> dict:
    """What a finished run leaves, minus its wall time."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_time_s")
    path = str(run_dir / "model.safetensors")
    with safe_open(path, framework="pt") as f:  # the header's key order is not fixed: compare its content
        header = f.metadata()
    return {"metrics": (run_dir / "metrics.jsonl").read_bytes(), "summary": summary, "header": header,
            "weights": load_file(path)}


def _same_outputs(a: Path, b: Path) -> bool:
    oa, ob = _outputs(a), _outputs(b)
    wa, wb = oa.pop("weights"), ob.pop("weights")
    return oa == ob and same_tensors(wa, wb)


@pytest.fixture(scope="module")
def tiny(request) -> dict:
    """TINY with the config seed from ``--seed`` (bit-identity must hold for every seed)."""
    return {**TINY, "seed": int(request.config.getoption("--seed"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "reference"
    execute(pretrain, pretrain.Config(**tiny), out, name="pretrain")
    return out


def _crash(tiny: dict, run_dir: Path, monkeypatch, at: int = 50) -> dict:
    """Run ``tiny``, raising when step ``at`` is logged (after the checkpoint at 40, with steps 40 … 49
    flushed to the metrics by the failing run); return the checkpoint's meta."""
    with crash_at(pretrain._LossLog, "__call__", at), pytest.raises(RuntimeError, match="simulated crash"):
        execute(pretrain, pretrain.Config(**tiny), run_dir, name="pretrain")
    return load_checkpoint(run_dir / "checkpoint.safetensors")[1]


def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, tiny, reference):
    run_dir = tmp_path / "crashed"
    meta = _crash(tiny, run_dir, monkeypatch)
    assert meta["step"] == 40 and meta["experiment"] == "pretrain"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 50  # written past the checkpoint
    name, _, result, files = resume(run_dir, JOBS)
    assert name == "pretrain" and files[-1] == "summary.json" and "checkpoint.safetensors" in files
    assert _same_outputs(reference, run_dir)
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert result.losses.tolist() == [r["loss"] for r in records]  # the whole curve, not only the resumed part


@pytest.mark.parametrize("part", ["trainer.generator", "trainer.ema"])
def test_control_a_resume_with_lost_state_differs(tmp_path, monkeypatch, tiny, reference, part):
    """Negative control: the same crash, but the checkpoint's generator state replaced by its state at
    the start (or its EMA weights by the raw weights): the comparison above must then fail."""
    run_dir = tmp_path / "crashed"
    _crash(tiny, run_dir, monkeypatch)
    path = run_dir / "checkpoint.safetensors"
    tensors, meta = load_checkpoint(path)
    if part == "trainer.generator":
        tensors[part] = torch.Generator().manual_seed(tiny["seed"]).get_state()
    else:
        for k in [k for k in tensors if k.startswith("trainer.ema.module.")]:
            tensors[k] = tensors["trainer.model." + k[len("trainer.ema.module."):]].clone()
    save_checkpoint(path, tensors, meta)
    resume(run_dir, JOBS)
    assert not _same_outputs(reference, run_dir)


def test_checkpoint_every_is_validated_and_left_out_of_the_reproduce_command():
    with pytest.raises(ConfigError, match=r"'checkpoint_every' must be None \(checkpoints only.* >= 1, got -1"):
        pretrain.Config(checkpoint_every=-1)
    assert "checkpoint_every" not in pretrain.reproduce_command(pretrain.Config(checkpoint_every=7))


def test_a_diverging_run_stops_at_once_and_keeps_a_finite_checkpoint(tmp_path, capsys):
    """lr = 1e10: Adam's first step moves every weight by ≈ 1e10, the next loss overflows float32 and θ
    becomes NaN at update 2. The run must stop there (exit 2, one line suggesting a smaller lr), keep the
    loss of every update before it, and leave the checkpoint of update 1 with finite tensors."""
    out = tmp_path / "run"
    rc = main(["pretrain", "moons", "--set", "lr=1e10", "--set", "checkpoint_every=1", "--no-progress",
               "--out", str(out), *[a for k, v in TINY.items() if k not in ("dataset", "progress", "checkpoint_every")
                                    for a in ("--set", f"{k}={v}")]])
    err = capsys.readouterr().err
    assert rc == 2 and "diverged at update" in err and "smaller lr (now 1e+10)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    update = int(err.split("diverged at update ")[1].split(":")[0])
    assert update >= 2  # late enough for a checkpoint before it
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(update - 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    tensors, meta = load_checkpoint(out / "checkpoint.safetensors")
    assert meta["step"] == update - 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())
    assert not (out / "summary.json").exists()


def test_ctrl_c_checkpoints_the_current_step_then_resumes(tmp_path, monkeypatch, tiny, reference, capsys):
    """SIGINT while step 30 is logged: a checkpoint after step 31 (not a multiple of 20), exit 130, and a
    resume gives the reference's outputs."""
    import os
    import signal

    original = pretrain._LossLog.__call__

    def interrupt(self, k, loss):
        if k == 30:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, k, loss)

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(pretrain._LossLog, "__call__", interrupt)
        rc = main(["pretrain", "moons", "--out", str(out), "--no-progress",
                   *[a for k, v in tiny.items() if k not in ("dataset", "progress") for a in ("--set", f"{k}={v}")]])
    assert rc == 130 and "continue with: implicit-diffusion resume" in capsys.readouterr().err
    assert load_checkpoint(out / "checkpoint.safetensors")[1]["step"] == 31
    resume(out, JOBS)
    assert _same_outputs(reference, out)
