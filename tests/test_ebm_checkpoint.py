"""``ebm``: a crash in either method's loop and a resume give the uninterrupted run's outputs bit for bit;
a step size far too large stops the run at the first non-finite update, keeping a finite checkpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import same_tensors
from safetensors import safe_open
from safetensors.torch import load_file

from implicit_diffusion.cli import main
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.experiments import EXPERIMENTS, ebm
from implicit_diffusion.runtime import recording
from implicit_diffusion.runtime.checkpoints import load_checkpoint, save_checkpoint
from implicit_diffusion.runtime.runner import execute, resume

# 40 single-loop updates (S = 1) and 8 nested ones (T = 5): checkpoints after updates 3, 6, ... of each loop;
# evaluations every 10 sampler steps (single: updates 10, 20, 30, 40; nested: updates 2, 4, 6, 8)
TINY = dict(num_train=300, num_heldout=200, num_particles=200, batch_size=100, num_steps=40, nested_inner_steps=5,
            hidden=16, eval_every=10, fresh_steps=20, progress=False, checkpoint_every=3)
_WALL = re.compile(rb', "wall_time_s": [^,}]*')


def _outputs(run_dir: Path) -> dict:
    """What a finished run leaves, minus wall times (the metrics' per-method ``wall_time_s`` included)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("single", "nested"):
        summary[key].pop("wall_time_s")
    weights = {}
    for key in ("single", "nested"):
        path = str(run_dir / f"energy_{key}.safetensors")
        with safe_open(path, framework="pt") as f:  # the header's key order is not fixed: compare its content
            weights[key] = (load_file(path), f.metadata())
    return {"metrics": _WALL.sub(b"", (run_dir / "metrics.jsonl").read_bytes()), "summary": summary,
            "weights": weights}


def _same_outputs(a: Path, b: Path) -> bool:
    oa, ob = _outputs(a), _outputs(b)
    same_weights = all(oa["weights"][k][1] == ob["weights"][k][1]
                       and same_tensors(oa["weights"][k][0], ob["weights"][k][0]) for k in ("single", "nested"))
    return oa["metrics"] == ob["metrics"] and oa["summary"] == ob["summary"] and same_weights


@pytest.fixture(scope="module")
def tiny(request) -> dict:
    """TINY with the config seed from ``--seed`` (bit-identity must hold for every seed)."""
    return {**TINY, "seed": int(request.config.getoption("--seed"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny) -> Path:
    """An uninterrupted run of TINY (with the same checkpoint interval)."""
    out = tmp_path_factory.mktemp("ebm") / "reference"
    execute(ebm, ebm.Config(**tiny), out, name="ebm")
    assert (out / "metrics.jsonl").read_bytes().count(b"wall_time_s") == 2  # the only per-run difference
    return out


def _crash(tiny: dict, run_dir: Path, monkeypatch, method: str, sampler_steps: int) -> dict:
    """Run ``tiny``, raising in the evaluation of ``method`` at ``sampler_steps``; return the checkpoint's meta."""
    original = recording.EvalRecorder.record

    def crash(self, done, x):
        if self.labels["method"] == method and done == sampler_steps:
            raise RuntimeError("simulated crash")
        return original(self, done, x)

    with monkeypatch.context() as m:
        m.setattr(recording.EvalRecorder, "record", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            execute(ebm, ebm.Config(**tiny), run_dir, name="ebm")
    return load_checkpoint(run_dir / "checkpoint.safetensors")[1]


# (method, sampler steps of the crash) → (method in the checkpoint, its step, finished methods)
CRASHES = {
    ("single", 20): ("single", 18, []),  # mid single loop
    ("nested", 10): ("single", 39, []),  # nested update 2, before the nested loop's first checkpoint
    ("nested", 40): ("nested", 6, ["single"]),  # nested update 8, after its checkpoint at 6
}


@pytest.mark.parametrize("crash", list(CRASHES), ids=[f"{m}-{s}" for m, s in CRASHES])
def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, tiny, reference, crash):
    """The crash comes after a checkpoint, with metrics written past it; ``resume`` gives the same
    metrics file (byte for byte, wall times aside), summary and energy weights as the reference."""
    run_dir = tmp_path / "crashed"
    meta = _crash(tiny, run_dir, monkeypatch, *crash)
    method, step, finished = CRASHES[crash]
    assert (meta["step"], meta["state"]["method"], sorted(meta["state"]["finished"])) == (step, method, finished)
    name, _, result, files = resume(run_dir, EXPERIMENTS)
    assert name == "ebm" and files[-5:-3] == ["energy_single.safetensors", "energy_nested.safetensors"]
    assert _same_outputs(reference, run_dir)
    # the in-memory result holds the whole history, not only the resumed part
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    for key in ("single", "nested"):
        curve = [(r["sampler_steps"], r["mmd2_particles"]) for r in records
                 if r["method"] == key and "mmd2_particles" in r]
        assert list(zip(result.methods[key].eval_steps.tolist(), result.methods[key].mmd_particles.tolist())) == curve


@pytest.mark.parametrize("generator", ["batches", "sampler"])
def test_control_a_resume_from_the_wrong_generator_state_differs(tmp_path, monkeypatch, tiny, reference, generator):
    """Negative control: the same crash (nested loop, after its checkpoint at update 6), but the checkpoint's
    minibatch or sampler generator state replaced by its state at the start of the loop (as if it were not
    restored): the comparison above must then fail."""
    run_dir = tmp_path / "crashed"
    _crash(tiny, run_dir, monkeypatch, "nested", 40)
    path = run_dir / "checkpoint.safetensors"
    tensors, meta = load_checkpoint(path)
    seed = tiny["seed"] + (1 if generator == "batches" else 0)
    tensors[f"train.generator.{generator}"] = torch.Generator().manual_seed(seed).get_state()
    save_checkpoint(path, tensors, meta)
    resume(run_dir, EXPERIMENTS)
    assert not _same_outputs(reference, run_dir)


def test_checkpoint_every_is_validated():
    with pytest.raises(ConfigError, match=r"'checkpoint_every' must be None \(checkpoints only.* >= 1, got -1"):
        ebm.Config(checkpoint_every=-1)
    with pytest.raises(ConfigError, match="'checkpoint_every' must be None .*got 0"):
        ebm.Config(checkpoint_every=0)  # the former sentinel for "only on a stop signal" is refused
    assert ebm.Config().checkpoint_every is None


def test_a_diverging_run_stops_at_once_and_keeps_a_finite_checkpoint(tmp_path, capsys):
    """γ = 1e20: ULA's noise √(2γ) ≈ 1.4e10 puts the particles where the energy MLP's values (≈ 1e19) make
    θ's gradient overflow; θ becomes non-finite at update 18 of the single loop (float32, seed 0). The run must stop
    there (exit 2, one line suggesting a smaller step size or lr), keep an evaluation for every update before
    it and none for the bad one, and leave the checkpoint of update 15 with finite particles and θ."""
    out = tmp_path / "run"
    rc = main(["run", "ebm", "--set", "step_size=1e20", "--set", "eval_every=1", "--checkpoint-every", "5",
               "--no-progress", "--out", str(out),
               *[a for k, v in TINY.items() if k not in ("progress", "eval_every", "checkpoint_every")
                 for a in ("--set", f"{k}={v}")]])
    err = capsys.readouterr().err
    assert rc == 2 and "diverged at update" in err and "smaller step_size (now 1e+20) or lr (now 0.001)" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    update = int(err.split("diverged at update ")[1].split(":")[0])
    assert update > 5  # late enough for a checkpoint before it
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampler_steps"] for r in records] == list(range(update))  # 0 … update − 1, all single loop
    assert all(r["method"] == "single" and math.isfinite(r["energy_gap"]) for r in records)
    tensors, meta = load_checkpoint(out / "checkpoint.safetensors")
    assert meta["step"] == 5 * ((update - 1) // 5) and meta["state"]["method"] == "single"
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith(("train.particles", "train.pot")))
    assert not (out / "summary.json").exists()


def test_ctrl_c_in_the_nested_loop_checkpoints_that_update_then_resumes(tmp_path, monkeypatch, tiny, reference,
                                                                       capsys):
    """SIGINT during the evaluation at nested update 4 (not a multiple of checkpoint_every = 3): the run
    checkpoints after that update, exits 130 with a hint to resume, and ``resume`` gives the reference's outputs."""
    import os
    import signal

    original = recording.EvalRecorder.record

    def interrupt(self, done, x):
        if self.labels["method"] == "nested" and done == 20:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, done, x)

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        m.setattr(recording.EvalRecorder, "record", interrupt)
        rc = main(["run", "ebm", "--out", str(out), "--no-progress",
                   *[a for k, v in tiny.items() if k != "progress" for a in ("--set", f"{k}={v}")]])
    assert rc == 130 and "continue with: implicit-diffusion resume" in capsys.readouterr().err
    meta = load_checkpoint(out / "checkpoint.safetensors")[1]
    assert (meta["step"], meta["state"]["method"]) == (4, "nested")
    assert main(["resume", str(out)]) == 0
    assert _same_outputs(reference, out)
