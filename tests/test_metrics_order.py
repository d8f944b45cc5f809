"""``metrics.jsonl`` holds its records in step order (every experiment), and the same bytes whatever
``checkpoint_every`` is and whether the run was interrupted and resumed (every experiment that checkpoints).

Records hold no timings, with one exception: ``ebm``'s per-method record of fresh samples has
``wall_time_s`` (the method's training time, also in ``summary.json``). It cannot be the same
in two runs, so the comparisons below drop that one field (and check that no other field of a
record is a time); everything else is compared byte for byte.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from implicit_diffusion.cli import main
from implicit_diffusion.experiments import (
    EXPERIMENTS,
    diffusion_finetune,
    diffusion_gaussian_1d,
    ebm,
    hyperparameter,
    langevin_mixture,
    pretrain,
    rates,
)
from implicit_diffusion.runtime.checkpoints import load_checkpoint
from implicit_diffusion.runtime.progress import ProgressBar
from implicit_diffusion.runtime.recording import OrderedSink, RewardRecorder
from implicit_diffusion.runtime.runner import execute, resume

JOBS = {**EXPERIMENTS, "pretrain": pretrain}  # resume must find pretrain too

# tiny configs (one thread where torch's default would be more: the tests share a few cores); evaluations
# every 4 (or 3) updates, so they fall between checkpoints every 3 updates and between the per-step records'
# blocks (1000 rewards in langevin-mixture, 100 in diffusion-finetune)
TINY = {
    "langevin-mixture": (langevin_mixture, dict(num_particles=20, num_steps=30, eval_every=4, snapshot_steps=(0,),
                                                progress=False)),
    "ebm": (ebm, dict(num_train=300, num_heldout=200, num_particles=50, batch_size=50, num_steps=12,
                      nested_inner_steps=3, hidden=8, eval_every=4, fresh_steps=5, progress=False)),
    "pretrain": (pretrain, dict(dataset="moons", num_points=200, num_steps=12, batch_size=16, hidden=8,
                                sampling_steps=4, progress=False, num_threads=1)),
    # a sweep of two runs of 7 iterations
    "diffusion-finetune": (diffusion_finetune, dict(num_steps=7, num_sampling_steps=3, batch_size=2, eval_every=3,
                                                    eval_samples=4, grid_images=2, sweep=True,
                                                    sweep_ratios=(10.0, 100.0), progress=False, num_threads=1)),
}
CHECKPOINTING = list(TINY)
# these write each method's (rule's, algorithm's) records at once, at its end, and do not checkpoint
TINY.update({
    "rates": (rates, dict(num_steps=50, num_particles=8, num_seeds=2, progress=False)),
    "hyperparameter": (hyperparameter, dict(num_updates=20, nested_updates=3, grid_points=41, progress=False)),
    "diffusion-gaussian-1d": (diffusion_gaussian_1d, dict(num_sampling_steps=5, num_steps=20, progress=False)),
})
# the updates (counted over every loop of the run, from 1) at which the crash comes: each after a
# checkpoint (every 3 updates), with evaluations and per-step records made since
CRASHES = {"langevin-mixture": [11, 17], "ebm": [9, 16], "pretrain": [8], "diffusion-finetune": [6, 12]}
_WALL = re.compile(rb', "wall_time_s": [^,}]*')


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("model") / "run"
    assert main(["pretrain", "digits", "--set", "num_steps=5", "--set", "base_channels=8", "--set", "num_samples=4",
                 "--set", "sampling_steps=3", "--set", "num_threads=1", "--no-progress", "--out", str(out)]) == 0
    return str(out / "model.safetensors")


def _config(name: str, tiny_model: str, checkpoint_every: int | None):
    module, settings = TINY[name]
    if name == "diffusion-finetune":
        settings = {**settings, "model": tiny_model}
    if checkpoint_every is not None:
        settings = {**settings, "checkpoint_every": checkpoint_every}
    return module, module.Config(**settings)


def _run(name: str, tiny_model: str, out: Path, checkpoint_every: int | None) -> Path:
    module, config = _config(name, tiny_model, checkpoint_every)
    execute(module, config, out, name=name)
    return out


def _metrics(run_dir: Path) -> bytes:
    """The metrics file, minus ``ebm``'s ``wall_time_s`` (see the module docstring)."""
    data = _WALL.sub(b"", (run_dir / "metrics.jsonl").read_bytes())
    keys = {k for line in data.splitlines() for k in json.loads(line)}
    assert not {k for k in keys if "time" in k or "wall" in k or k == "seconds"}, keys  # nothing else is a time
    return data


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """Each experiment run without periodic checkpoints (checkpoint_every = None, the default)."""
    base = tmp_path_factory.mktemp("references")
    return {name: _run(name, tiny_model, base / name, None) for name in TINY}


def _order_key(record: dict) -> tuple[int, int]:
    """(step, kind): at one step, an evaluation (the state after that many updates) comes before the
    per-step record of the next update; a record without a step (ebm's fresh samples) comes last."""
    step = next((record[k] for k in ("step", "eval_step", "sampler_steps", "update", "K") if k in record), None)
    if step is None:
        return (1 << 62, 2)
    per_step = "step" in record and set(record) <= {"run", "step", "reward", "loss"}
    return (step, 1 if per_step else 0)


def _assert_in_step_order(run_dir: Path) -> None:
    """Records come group by group (ebm's methods, a sweep's runs, rates' rules and seeds, ...), each group
    in (step, kind) order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records
    groups: list = []
    keys: list[tuple] = []
    for i, r in enumerate(records):
        group = tuple(r.get(k) for k in ("method", "run", "algorithm", "rule", "seed"))
        if not groups or groups[-1] != group:
            assert group not in groups, f"line {i + 1}: group {group!r} comes back after {groups[-1]!r}"
            groups.append(group)
        keys.append((len(groups), *_order_key(r)))
    out_of_order = next((i for i in range(1, len(keys)) if keys[i] < keys[i - 1]), None)
    assert out_of_order is None, (f"line {out_of_order + 1} comes before line {out_of_order}: "
                                  f"{records[out_of_order - 1]} then {records[out_of_order]}")


@pytest.mark.parametrize("name", list(TINY))
def test_records_are_in_step_order(name, references):
    """(a) Steps never go back: an evaluation at step s comes right after the per-step record of the
    update that reached s (not once the per-step block is handed over, a thousand steps later)."""
    _assert_in_step_order(references[name])


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("name", CHECKPOINTING)
def test_checkpoints_do_not_change_the_metrics(name, every, references, tiny_model, tmp_path):
    """(b) With a checkpoint every 1 or 3 updates, the metrics file is the one written without any."""
    run_dir = _run(name, tiny_model, tmp_path / "run", every)
    assert (run_dir / "checkpoint.safetensors").exists()
    assert _metrics(run_dir) == _metrics(references[name])


def _crash_at_update(patch: pytest.MonkeyPatch, update: int) -> None:
    """Raise from a loop callback (the progress bar's) at the ``update``-th update of the run."""
    original, calls = ProgressBar.__call__, {"n": 0}

    def crashing(self, k, x, stats):
        calls["n"] += 1
        if calls["n"] == update:
            raise RuntimeError("simulated crash")
        return original(self, k, x, stats)

    patch.setattr(ProgressBar, "__call__", crashing)


@pytest.mark.parametrize("name,update", [(n, u) for n, us in CRASHES.items() for u in us])
def test_a_crashed_and_resumed_run_writes_the_uninterrupted_metrics(name, update, references, tiny_model, tmp_path,
                                                                    monkeypatch):
    """(c) A crash after a checkpoint, with records written past it, then ``resume``: the metrics
    file is the uninterrupted run's (the one without checkpoints), byte for byte."""
    module, config = _config(name, tiny_model, 3)
    run_dir = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        _crash_at_update(patch, update)
        with pytest.raises(RuntimeError, match="simulated crash"):
            execute(module, config, run_dir, name=name)
    _, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert (run_dir / "metrics.jsonl").stat().st_size > meta["metrics_offset"]  # records past the checkpoint
    assert resume(run_dir, JOBS)[0] == name
    assert _metrics(run_dir) == _metrics(references[name])
    _assert_in_step_order(run_dir)


def test_the_ordered_sink_hands_held_records_over_before_any_other():
    """Unit: per-step rewards held by the recorder go out before a later record and when a
    checkpoint takes the recorder's state (so a stopped run's file is complete up to it); either
    way the records stay in step order; a resumed recorder writes what its state says was still held."""
    lines: list[dict] = []
    sink = OrderedSink(lines.extend)
    rewards = RewardRecorder(8, sink, block=4)
    for k in range(2):
        rewards(k, None, {"reward": float(k)})
    sink([{"step": 2, "exact_reward": 9.0}])  # an evaluation after update 1: the held rewards go first
    assert [(r["step"], "reward" in r) for r in lines] == [(0, True), (1, True), (2, False)]
    rewards(2, None, {"reward": 2.0})
    tensors, meta = rewards.state()  # a checkpoint after update 2 hands step 2 over
    assert [r["step"] for r in lines] == [0, 1, 2, 2] and lines[-1] == {"step": 2, "reward": 2.0}
    assert meta == {"count": 3, "flushed": 3}
    # a state whose rewards were not all handed over: the resumed recorder hands them over, in order
    again: list[dict] = []
    other = OrderedSink(again.extend)
    resumed = RewardRecorder(8, other, block=4)
    resumed.load_state(tensors, {"count": 3, "flushed": 1})
    resumed(3, None, {"reward": 3.0})  # a full block of 4
    assert [r["step"] for r in again] == [1, 2, 3]
    with pytest.raises(ValueError, match="already has a recorder"):
        RewardRecorder(8, sink)
    with pytest.raises(ValueError, match="'flushed' must be from 0 to the 3 steps recorded, got 4"):
        RewardRecorder(8, OrderedSink(again.extend)).load_state(tensors, {"count": 3, "flushed": 4})
