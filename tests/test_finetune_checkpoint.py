"""Checkpoint and resume of ``diffusion-finetune``: the queue's in-flight batches and pending
adjoints, θ, Adam and the generator survive a checkpoint, and a crashed run (or sweep) resumed
from it ends bit for bit where the uninterrupted run ends (CPU). Negative controls: a resume
that drops the queue's batches, or the generator's state, does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import same_tensors
from safetensors.torch import load_file

from implicit_diffusion.algorithms import DiffusionQueue
from implicit_diffusion.algorithms.diffusion_base import DiffusionAlgorithm
from implicit_diffusion.algorithms.diffusion_nested import DiffusionNestedLoop
from implicit_diffusion.cli import main
from implicit_diffusion.experiments import EXPERIMENTS
from implicit_diffusion.experiments import diffusion_finetune as ft
from implicit_diffusion.models import UNet
from implicit_diffusion.objectives import GirsanovKL, brightness
from implicit_diffusion.runtime import runner
from implicit_diffusion.runtime.checkpoints import load_checkpoint, save_checkpoint
from implicit_diffusion.runtime.runner import execute, resume
from implicit_diffusion.samplers import VPSchedule, euler_maruyama_step, to_score

SHAPE = (1, 8, 8)
# 12 iterations of M = 4 steps; checkpoints after 5 and 10; evaluations at 0, 6, 12; grids at 0, 4, 8, 12
TINY = dict(num_steps=12, num_sampling_steps=4, batch_size=2, eval_every=6, eval_samples=4, grid_images=4,
            progress=False, checkpoint_every=5)


# --- the algorithms' own state ------------------------------------------------------------------

def _algorithm(kind: str):
    torch.manual_seed(0)  # UNet's default initialisation only; the algorithm uses its generator
    model = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2))
    sched = VPSchedule("linear", num_steps=4)
    kl = GirsanovKL(model, sched, 0.5, to_score=lambda out, x, t: to_score(out, x, t, sched, "epsilon"))
    cls, options = {"pipelined": (DiffusionQueue, {"adjoint": "pipelined"}),
                    "sequential": (DiffusionQueue, {"adjoint": "sequential"}),
                    "nested": (DiffusionNestedLoop, {"gradient": "adjoint"})}[kind]
    return cls(model, euler_maruyama_step, sched, torch.optim.Adam(model.parameters(), lr=3e-3),
               init_fn=lambda g: torch.randn(2, *SHAPE, generator=g), reward_fn=brightness, reward_weight=10.0,
               running_cost=kl, prediction="epsilon", max_grad_norm=1.0, **options)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pipelined", "sequential", "nested"])
def test_an_algorithm_reloaded_from_its_state_continues_bit_for_bit(kind, tmp_path):
    """Run 6 iterations, save ``state()`` (through a checkpoint file), load it into a freshly built
    copy and run 5 more on both: θ agrees exactly. With M = 4 the queue holds 3 in-flight batches
    (and, pipelined, 3 pending adjoints) at the save. Control (queue only): a copy given θ and Adam
    but an empty queue ends elsewhere."""
    a, g = _algorithm(kind), torch.Generator().manual_seed(0)
    a.run(6, generator=g)
    tensors, meta = a.state()
    if kind != "nested":
        assert meta["flights"] == [1, 2, 3]
        assert meta["adjoint_steps"] == ([0, 1, 2] if kind == "pipelined" else [])
    save_checkpoint(tmp_path / "c.safetensors", {**tensors, "g": g.get_state()}, meta)
    tensors, meta = load_checkpoint(tmp_path / "c.safetensors")
    b, h = _algorithm(kind), torch.Generator()
    b.load_state(tensors, meta)
    h.set_state(tensors["g"])
    a.run(5, generator=g, start=6)
    b.run(5, generator=h, start=6)
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    if kind != "nested":  # control: the in-flight batches and adjoints are state too
        c, h = _algorithm(kind), torch.Generator()
        DiffusionAlgorithm.load_state(c, tensors, meta)
        h.set_state(tensors["g"])
        c.run(5, generator=h, start=6)
        assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), c.model.parameters()))


def test_a_queue_refuses_the_other_adjoint_modes_state():
    tensors, meta = _algorithm("pipelined").state()
    with pytest.raises(ValueError, match="'pipelined' adjoint; this one runs 'sequential'"):
        _algorithm("sequential").load_state(tensors, meta)


# --- the experiment: crash, resume, compare -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pre") / "run"
    args = ["pretrain", "digits", "--set", "num_steps=5", "--set", "base_channels=8", "--set", "num_samples=4",
            "--set", "sampling_steps=3", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    return str(out / "model.safetensors")


def _outputs(run_dir: Path) -> dict:
    """What a finished run leaves, minus wall times."""
    summary = json.loads((run_dir / "summary.json").read_text())
    for r in summary["runs"]:
        r.pop("wall_time_s")
    weights = {p.name: load_file(str(p)) for p in sorted(run_dir.glob("finetuned*.safetensors"))}
    return {"metrics": (run_dir / "metrics.jsonl").read_bytes(), "summary": summary, "weights": weights}


def _differences(a: Path, b: Path) -> list[str]:
    oa, ob = _outputs(a), _outputs(b)
    out = []
    la, lb = oa["metrics"].splitlines(), ob["metrics"].splitlines()
    if la != lb:
        first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), min(len(la), len(lb)))
        out.append(f"metrics: {len(la)} vs {len(lb)} lines, first difference at line {first}")
    if oa["summary"] != ob["summary"]:
        out.append(f"summary: {oa['summary']} vs {ob['summary']}")
    if oa["weights"].keys() != ob["weights"].keys():
        out.append(f"weight files: {sorted(oa['weights'])} vs {sorted(ob['weights'])}")
    for name, wa in oa["weights"].items():
        wb = ob["weights"].get(name, {})
        if wa.keys() != wb.keys() or any(not torch.equal(wa[k], wb[k]) for k in wa):
            out.append(f"weights in {name}")
    return out


def _same_records(a: ft.Result, b: ft.Result) -> None:
    """The in-memory results (returned by execute and by resume) carry the same whole history."""
    assert a.base == b.base and len(a.runs) == len(b.runs)
    for ra, rb in zip(a.runs, b.runs):
        assert (ra.label, ra.reward_weight, ra.kl_weight) == (rb.label, rb.reward_weight, rb.kl_weight)
        assert np.array_equal(ra.train_reward, rb.train_reward, equal_nan=True)
        assert ra.evals == rb.evals
        assert [s for s, _ in ra.grids] == [s for s, _ in rb.grids] == [0, 4, 8, 12]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(ra.grids, rb.grids))
        assert same_tensors(ra.state, rb.state)


def _crash_at_grid(monkeypatch, call: int) -> None:
    """The ``call``-th grid (counting from 1) raises: grids come at 0, 4, 8, 12 of every run."""
    real, calls = ft.sample_images, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "sample_images", crashing)


def _crashed_then_resumed(cfg: ft.Config, run_dir: Path, monkeypatch, crash_call: int, *, step: int, run_index: int):
    """Run until the simulated crash, check the checkpoint it left, resume; returns resume's result."""
    with monkeypatch.context() as patch:
        _crash_at_grid(patch, crash_call)
        with pytest.raises(RuntimeError, match="simulated crash"):
            execute(ft, cfg, run_dir, name="diffusion-finetune")
    assert not (run_dir / "summary.json").exists()
    _, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert (meta["step"], meta["state"]["run_index"]) == (step, run_index)
    name, _, result, files = resume(run_dir, EXPERIMENTS)
    assert name == "diffusion-finetune" and "summary.json" in files
    return result


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["queue-pipelined", "queue-sequential", "nested-adjoint"])
def test_a_crashed_finetuning_run_resumes_to_the_uninterrupted_result(algorithm, tiny_model, tmp_path, monkeypatch):
    """A crash at iteration 8 (after the checkpoint at 5, with the evaluation at 6 written past
    it) and a resume give the uninterrupted run's metrics file (bytes), summary (minus wall
    times), finetuned weights and in-memory history, bit for bit."""
    cfg = ft.Config(model=tiny_model, algorithm=algorithm, **TINY)
    reference, _ = execute(ft, cfg, tmp_path / "reference", name="diffusion-finetune")
    run_dir = tmp_path / "crashed"
    result = _crashed_then_resumed(cfg, run_dir, monkeypatch, 3, step=5, run_index=0)
    saved, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert (meta["step"], meta["state"]["run_index"]) == (10, 0)  # the resumed run wrote its own at 10
    if algorithm.startswith("queue"):
        assert meta["state"]["run"]["algo"]["flights"] == [1, 2, 3]
        assert "run.algo.flight.2.noises" in saved
    assert _differences(tmp_path / "reference", run_dir) == []
    _same_records(reference, result)


@pytest.mark.slow
def test_a_sweep_crashed_in_its_second_run_resumes_to_the_uninterrupted_result(tiny_model, tmp_path, monkeypatch):
    """``--sweep`` over λ/β ∈ {10, 1000}: a crash at iteration 8 of the second run resumes from its
    checkpoint at 5 (the first run's results come from the checkpoint) to the uninterrupted sweep."""
    cfg = ft.Config(model=tiny_model, sweep=True, sweep_ratios=(10.0, 1000.0), **TINY)
    reference, _ = execute(ft, cfg, tmp_path / "reference", name="diffusion-finetune")
    run_dir = tmp_path / "crashed"
    result = _crashed_then_resumed(cfg, run_dir, monkeypatch, 4 + 3, step=5, run_index=1)
    assert _differences(tmp_path / "reference", run_dir) == []
    assert sorted(_outputs(run_dir)["weights"]) == ["finetuned-0.safetensors", "finetuned-1.safetensors"]
    _same_records(reference, result)


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_checkpoints_at_once_then_resumes(tiny_model, tmp_path, monkeypatch):
    """SIGINT during iteration 7 of the second run (in its grid at 8): the run finishes that
    iteration, writes a checkpoint after 8 (not a multiple of checkpoint_every) and stops with
    RunInterrupted; resuming gives the uninterrupted sweep."""
    import signal

    from implicit_diffusion.runtime.checkpoints import RunInterrupted

    cfg = ft.Config(model=tiny_model, sweep=True, sweep_ratios=(10.0, 1000.0), **TINY)
    execute(ft, cfg, tmp_path / "reference", name="diffusion-finetune")
    real, calls = ft.sample_images, {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 + 3:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    run_dir = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(ft, "sample_images", interrupting)
        with pytest.raises(RunInterrupted) as info:
            execute(ft, cfg, run_dir, name="diffusion-finetune")
    assert info.value.step == 8
    _, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert (meta["step"], meta["state"]["run_index"]) == (8, 1)
    resume(run_dir, EXPERIMENTS)
    assert _differences(tmp_path / "reference", run_dir) == []


def _fresh_generator_state(tensors: dict) -> dict:
    return {**tensors, "run.generator": torch.Generator().manual_seed(0).get_state()}


def _empty_queue(tensors: dict, meta: dict) -> tuple[dict, dict]:
    algo = meta["state"]["run"]["algo"]
    # the queue's tensors go too: a record without flights but with their tensors is refused (DataError)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("run.algo.flight.", "run.algo.adjoint."))}
    return tensors, {**meta, "state": {**meta["state"], "run": {
        **meta["state"]["run"], "algo": {**algo, "flights": [], "adjoint_steps": []}}}}


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["generator", "queue"])
def test_negative_control_a_resume_that_loses_state_differs(lost, tiny_model, tmp_path, monkeypatch):
    """The comparison above can fail: resuming with the generator back at its seed, or with an
    empty queue (no in-flight batches, no pending adjoints), ends with other metrics and weights."""
    cfg = ft.Config(model=tiny_model, **TINY)
    execute(ft, cfg, tmp_path / "reference", name="diffusion-finetune")
    real = runner.load_checkpoint

    def lossy(path):
        tensors, meta = real(path)
        return (_fresh_generator_state(tensors), meta) if lost == "generator" else _empty_queue(tensors, meta)

    monkeypatch.setattr(runner, "load_checkpoint", lossy)
    run_dir = tmp_path / "crashed"
    _crashed_then_resumed(cfg, run_dir, monkeypatch, 3, step=5, run_index=0)
    differences = _differences(tmp_path / "reference", run_dir)
    assert any(d.startswith("metrics") for d in differences) and "weights in finetuned.safetensors" in differences


@pytest.mark.slow
def test_checkpointing_changes_no_result_and_the_summary_comes_last(tiny_model, tmp_path, monkeypatch):
    """checkpoint_every = 5 writes checkpoints but the same metrics, summary and weights as None. A
    crash in ``save`` (drawing the curves, after the weights) leaves no summary.json, so the run
    is not complete: resume finishes it, to the same files."""
    import implicit_diffusion.plotting.diffusion as plots

    for every in (None, 5):
        execute(ft, ft.Config(model=tiny_model, **{**TINY, "checkpoint_every": every}), tmp_path / f"every-{every}",
                name="diffusion-finetune")
    assert not (tmp_path / "every-None" / "checkpoint.safetensors").exists()
    assert (tmp_path / "every-5" / "checkpoint.safetensors").exists()
    assert _differences(tmp_path / "every-None", tmp_path / "every-5") == []

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash in save")

    with monkeypatch.context() as patch:
        patch.setattr(plots, "plot_finetune_curves", crash)
        with pytest.raises(RuntimeError, match="crash in save"):
            execute(ft, ft.Config(model=tiny_model, **TINY), tmp_path / "save-crashed", name="diffusion-finetune")
    assert (tmp_path / "save-crashed" / "finetuned.safetensors").exists()
    assert not (tmp_path / "save-crashed" / "summary.json").exists()
    resume(tmp_path / "save-crashed", EXPERIMENTS)
    assert _differences(tmp_path / "every-None", tmp_path / "save-crashed") == []


def test_a_negative_checkpoint_interval_is_a_config_error():
    from implicit_diffusion.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'checkpoint_every' must be None \(checkpoints only.* >= 1, got -1"):
        ft.Config(checkpoint_every=-1)


@pytest.mark.slow
def test_a_crashed_diffusers_finetuning_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """The same with a local diffusers model (the adapter's weights are θ): the UNet written back
    in diffusers' format is bit-identical to the uninterrupted run's."""
    diffusers = pytest.importorskip("diffusers")
    with torch.random.fork_rng():  # diffusers initialises from the global RNG: seed it without leaking
        torch.manual_seed(0)
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                     layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
        tmp_path / "tiny-ddpm")
    cfg = ft.Config(diffusers_model=str(tmp_path / "tiny-ddpm"), lr=1e-2, **TINY)
    execute(ft, cfg, tmp_path / "reference", name="diffusion-finetune")
    _crashed_then_resumed(cfg, tmp_path / "crashed", monkeypatch, 3, step=5, run_index=0)
    assert _differences(tmp_path / "reference", tmp_path / "crashed") == []
    [weights] = sorted((tmp_path / "reference" / "diffusers").rglob("*.safetensors"))
    a = load_file(str(weights))
    b = load_file(str(tmp_path / "crashed" / weights.relative_to(tmp_path / "reference")))
    assert same_tensors(a, b)
