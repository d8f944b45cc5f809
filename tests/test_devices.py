"""Devices and precisions: names, one-line errors for absent devices, every experiment on an
explicit ``--device cpu``, bfloat16 autocast with float32 master weights, placement on load
(``map_location``-style), generators across device types, bucketed gradient all-reduce.

No GPU is needed: CUDA availability is simulated where only names are resolved, the ``meta``
device stands in for "another device" where placement is checked, and the tests that need a
real GPU are skipped without one.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from implicit_diffusion import distributed
from implicit_diffusion.cli import main
from implicit_diffusion.devices import Autocast, resolve_device, resolve_precision
from implicit_diffusion.errors import ConfigError
from implicit_diffusion.runtime.state import CrossDeviceResume, load_state_of, state_of

HAS_CUDA = torch.cuda.is_available()


# --- names ---------------------------------------------------------------------------------------

def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu"))


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "CPU", "cuda:0:1", ""])
def test_a_malformed_device_name_is_refused_with_the_allowed_forms(name):
    with pytest.raises(ConfigError, match=r"unknown device .*; allowed: auto, cpu, cuda, cuda:N, mps"):
        resolve_device(name)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_an_absent_gpu_is_a_one_line_error_naming_what_is_available(name):
    with pytest.raises(ConfigError) as e:
        resolve_device(name)
    msg = str(e.value)
    assert "\n" not in msg and f"device {name!r} is not available" in msg and msg.endswith("available: cpu")


def test_cuda_names_follow_the_local_rank_and_the_device_count(monkeypatch):
    """Simulated: two GPUs. ``cuda`` is the process's LOCAL_RANK GPU; ``cuda:5`` is refused with the list."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'cuda:5' is not available; available: cpu, cuda:0, cuda:1"):
        resolve_device("cuda:5")


def test_precisions():
    cpu = torch.device("cpu")
    assert resolve_precision("float64", cpu).dtype == torch.float64
    bf = resolve_precision("bfloat16", cpu)
    assert (bf.dtype, bf.autocast) == (torch.float32, torch.bfloat16)
    with pytest.raises(ConfigError, match="'dtype': unknown 'float16'; allowed: float32, float64, bfloat16"):
        resolve_precision("float16", cpu)
    with pytest.raises(ConfigError, match="not supported on the 'mps' device"):
        resolve_precision("float64", torch.device("mps"))
    with pytest.raises(ConfigError, match="allowed: float32, float64$"):
        resolve_precision("bfloat16", cpu, allowed=("float32", "float64"))


def test_autocast_runs_the_forward_in_bfloat16_and_keeps_float32_weights():
    """The wrapped forward equals the layer computed on bfloat16-rounded inputs and weights (and
    differs from the float32 forward: the control); gradients reach the float32 parameters."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    net = Autocast(layer, torch.bfloat16)
    x = torch.randn(32, 16)
    out = net(x)
    assert out.dtype == torch.float32 and all(p.dtype == torch.float32 for p in net.parameters())
    bf = nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float()
    assert torch.equal(out, bf)
    assert not torch.allclose(out, layer(x), rtol=0, atol=1e-6)
    out.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.dtype == torch.float32


def test_autocast_reads_the_wrapped_models_attributes():
    inner = nn.Linear(2, 2)
    inner.prediction = "epsilon"
    net = Autocast(inner)
    assert net.prediction == "epsilon" and net.model is inner
    assert list(net.state_dict()) == ["model.weight", "model.bias"]


# --- every experiment on an explicit --device cpu ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    args = ["pretrain", "digits", "--device", "cpu", "--set", "num_steps=5", "--set", "base_channels=8",
            "--set", "num_samples=4", "--set", "sampling_steps=3", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    return out / "model.safetensors"


RUNS = {
    "langevin-mixture": ["--set", "num_steps=40", "--set", "num_particles=100", "--set", "eval_every=20"],
    "ebm": ["--set", "num_train=300", "--set", "num_heldout=200", "--set", "num_particles=100", "--set",
            "batch_size=50", "--set", "num_steps=20", "--set", "nested_inner_steps=10", "--set", "hidden=8",
            "--set", "eval_every=10", "--set", "fresh_steps=5"],
    "hyperparameter": ["--set", "num_updates=20", "--set", "nested_updates=2", "--set", "grid_points=21"],
    "rates": ["--set", "num_steps=50", "--set", "num_particles=8", "--set", "num_seeds=1"],
    "diffusion-gaussian-1d": ["--set", "num_steps=10", "--set", "num_sampling_steps=3", "--set", "batch_size=8"],
    "diffusion-finetune": ["--set", "num_steps=4", "--set", "num_sampling_steps=3", "--set", "batch_size=2",
                           "--set", "eval_every=2", "--set", "eval_samples=6", "--set", "grid_images=4"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_experiment_runs_with_device_cpu_given_explicitly(name, tiny_model, tmp_path):
    out = tmp_path / "run"
    extra = ["--set", f"model='{tiny_model}'"] if name == "diffusion-finetune" else []
    assert main(["run", name, "--device", "cpu", *RUNS[name], *extra, "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["device"] == "cpu"
    assert 'device = "cpu"' in (out / "config.toml").read_text()
    assert (out / "summary.json").exists()


def test_pretrain_records_its_device(tiny_model):
    assert json.loads((tiny_model.parent / "run.json").read_text())["device"] == "cpu"


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["run", "langevin-mixture"], ["run", "diffusion-finetune"],
                                     ["pretrain", "moons"]])
def test_a_missing_device_stops_before_anything_is_written(command, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*command, "--device", "cuda:0", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "device 'cuda:0' is not available" in err and "available: cpu" in err
    assert not out.exists()


def test_dtype_is_refused_where_it_is_not_a_setting(tmp_path, capsys):
    assert main(["run", "hyperparameter", "--dtype", "float32", "--out", str(tmp_path / "r")]) == 2
    assert "unknown config key 'dtype'" in capsys.readouterr().err


# --- precision in the diffusion experiments ------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_finetune_in_another_precision(dtype, tiny_model, tmp_path):
    """bfloat16: float32 master weights, forwards under autocast — it trains, the outputs are finite
    and differ from the float32 run's (the forwards really ran in bfloat16); float64: the weights
    written are float64's rounding of a float64 run."""
    from safetensors.torch import load_file

    runs = {}
    for d in ("float32", dtype):
        out = tmp_path / d
        assert main(["run", "diffusion-finetune", "--device", "cpu", "--dtype", d, "--set", f"model='{tiny_model}'",
                     *RUNS["diffusion-finetune"], "--no-progress", "--out", str(out)]) == 0
        runs[d] = (json.loads((out / "summary.json").read_text())["runs"][0], load_file(out / "finetuned.safetensors"))
    (ref, _), (other, w) = runs["float32"], runs[dtype]
    assert all(torch.isfinite(v).all() for v in w.values())
    assert other["reward"] != ref["reward"] and other["kl"] >= 0
    expected = torch.float64 if dtype == "float64" else torch.float32
    assert {v.dtype for k, v in w.items() if v.is_floating_point()} == {expected}


def test_pretrain_in_bfloat16_saves_a_plain_float32_model(tmp_path):
    from implicit_diffusion.models.io import load_score_model

    out = tmp_path / "run"
    assert main(["pretrain", "moons", "--device", "cpu", "--dtype", "bfloat16", "--set", "num_points=256",
                 "--set", "num_steps=10", "--set", "batch_size=32", "--set", "hidden=16", "--set", "sampling_steps=5",
                 "--no-progress", "--out", str(out)]) == 0
    loaded = load_score_model(out / "model.safetensors")  # the file format of any pretrained model: no wrapper
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert "--set dtype=bfloat16" in loaded.extra["reproduce"]


# --- placement on load, generators across devices --------------------------------------------------

def _queue(device: str):
    from implicit_diffusion.algorithms import DiffusionQueue
    from implicit_diffusion.models import UNet
    from implicit_diffusion.objectives import brightness
    from implicit_diffusion.samplers import VPSchedule, euler_maruyama_step

    torch.manual_seed(0)
    model = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2)).to(device)
    return DiffusionQueue(model, euler_maruyama_step, VPSchedule("linear", num_steps=3),
                          torch.optim.Adam(model.parameters(), lr=1e-3),
                          init_fn=lambda g: torch.randn(2, 1, 8, 8, generator=g, device=device),
                          reward_fn=brightness, prediction="epsilon", adjoint="pipelined")


@pytest.mark.filterwarnings("ignore:for .*. copying from a non-meta parameter:UserWarning")  # meta holds no values
def test_a_checkpoint_loads_onto_the_live_objects_device(tmp_path):
    """Saved from the CPU through a checkpoint file, restored into objects on another device (``meta``
    here; ``cuda`` on a GPU machine): every parameter, Adam moment and in-flight queue tensor lands
    on the live objects' device, like ``torch.load(map_location=...)``."""
    from implicit_diffusion.runtime.checkpoints import load_checkpoint, save_checkpoint

    queue, g = _queue("cpu"), torch.Generator().manual_seed(0)
    queue.run(6, generator=g)  # M = 3: updates from iteration 4 on (the fill), Adam has moments
    tensors, meta = state_of({"algo": queue, "generator": g})
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"state": meta})
    tensors, saved = load_checkpoint(tmp_path / "c.safetensors")
    assert {t.device.type for t in tensors.values()} == {"cpu"}

    other = _queue("meta")
    g_other = torch.Generator()
    load_state_of({"algo": other, "generator": g_other}, tensors, saved["state"])
    assert {p.device.type for p in other.model.parameters()} == {"meta"}
    moments = [v for s in other.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
    assert moments and {v.device.type for v in moments} == {"meta"}
    queued = [x for f in other.flights for x in (*f.states, *f.noises)]
    queued += [j.a for j in other.adjoints] + [x for j in other.adjoints for x in j.flight.states]
    assert queued and {x.device.type for x in queued} == {"meta"}
    assert torch.equal(g_other.get_state(), g.get_state())  # same device type: the same stream


def test_a_generator_saved_on_another_device_type_is_reseeded_deterministically():
    g = torch.Generator().manual_seed(5)
    tensors, meta = state_of({"generator": g})
    assert meta == {"generator": {"device": "cpu"}}
    meta = {"generator": {"device": "cuda"}}  # as written by a run on a GPU
    draws = []
    for _ in range(2):
        fresh = torch.Generator().manual_seed(123)
        with pytest.warns(CrossDeviceResume, match="re-seeded from the saved states"):
            load_state_of({"generator": fresh}, tensors, meta)
        draws.append(torch.randn(4, generator=fresh))
    assert torch.equal(draws[0], draws[1])  # deterministic
    assert not torch.equal(draws[0], torch.randn(4, generator=torch.Generator().manual_seed(123)))


def test_a_generator_saved_before_devices_were_recorded_loads_as_a_cpu_one():
    g = torch.Generator().manual_seed(7)
    tensors, _ = state_of({"generator": g})
    fresh = torch.Generator()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_state_of({"generator": fresh}, tensors, {})
    assert torch.equal(fresh.get_state(), g.get_state())


def _main_interrupted_at(args: list[str], done_at: int, monkeypatch) -> int:
    """``main(args)`` with the run stopped, as by Ctrl-C, when its evaluation after ``done_at``
    updates comes (the last checkpoint before it is what ``resume`` continues from)."""
    from implicit_diffusion.runtime.checkpoints import RunInterrupted
    from implicit_diffusion.runtime.recording import EvalRecorder

    original = EvalRecorder.record

    def crash(self, done, x):
        if done == done_at:
            raise RunInterrupted(done, Path("unused"))
        return original(self, done, x)

    with monkeypatch.context() as patch:
        patch.setattr(EvalRecorder, "record", crash)
        return main(args)


def test_resume_with_device_cpu_continues_bit_for_bit(tmp_path, monkeypatch):
    """A checkpointed run resumed with ``--device cpu`` (its own device here) ends with the same files
    as the uninterrupted run."""
    args = ["run", "langevin-mixture", "--device", "cpu", "--set", "num_steps=60", "--set", "num_particles=100",
            "--set", "eval_every=20", "--checkpoint-every", "30", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert _main_interrupted_at([*args, "--out", str(tmp_path / "cut")], 40, monkeypatch) == 130
    assert main(["resume", str(tmp_path / "cut"), "--device", "cpu"]) == 0
    assert (tmp_path / "whole" / "metrics.jsonl").read_bytes() == (tmp_path / "cut" / "metrics.jsonl").read_bytes()
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "whole" / "theta.safetensors")["theta"],
                       load_file(tmp_path / "cut" / "theta.safetensors")["theta"])


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")
def test_resume_on_an_absent_device_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", "langevin-mixture", "--device", "cpu", "--set", "num_steps=20", "--set", "num_particles=50",
                 "--set", "eval_every=10", "--checkpoint-every", "10", "--no-progress", "--out", str(run)]) == 0
    (run / "summary.json").unlink()  # as if it had not finished
    capsys.readouterr()
    assert main(["resume", str(run), "--device", "cuda"]) == 2
    assert "device 'cuda' is not available" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_a_run_written_on_cuda_resumes_on_the_cpu(tmp_path, monkeypatch):  # pragma: no cover - GPU machines only
    args = ["run", "langevin-mixture", "--device", "cuda", "--set", "num_steps=60", "--set", "num_particles=100",
            "--set", "eval_every=20", "--checkpoint-every", "30", "--no-progress", "--out", str(tmp_path / "r")]
    assert _main_interrupted_at(args, 40, monkeypatch) == 130
    with pytest.warns(CrossDeviceResume):
        assert main(["resume", str(tmp_path / "r"), "--device", "cpu"]) == 0
    assert (tmp_path / "r" / "summary.json").exists()


# --- gradients all-reduced in buckets --------------------------------------------------------------

def test_gradients_are_all_reduced_in_flat_buckets(monkeypatch):
    """With a stand-in for a 2-process sum (each call doubles its tensor), every gradient doubles —
    each exactly once — and the calls are the buckets of at most ``bucket_numel`` numbers per dtype."""
    calls = []

    def fake_all_reduce(t):
        calls.append((t.numel(), t.dtype))
        t.mul_(2)

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", fake_all_reduce)
    params = [nn.Parameter(torch.zeros(n)) for n in (3, 4, 2, 6)] + [nn.Parameter(torch.zeros(5, dtype=torch.float64))]
    for i, p in enumerate(params):
        p.grad = torch.arange(p.numel(), dtype=p.dtype) + i
    params.append(nn.Parameter(torch.zeros(2)))  # no gradient: skipped
    expected = [p.grad.clone() * 2 for p in params[:-1]]
    distributed.all_reduce_grads(params, bucket_numel=7)
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected))
    assert params[-1].grad is None
    # float32 buckets [3 + 4], [2] (2 + 6 > 7), [6]; then the float64 one
    assert calls == [(7, torch.float32), (2, torch.float32), (6, torch.float32), (5, torch.float64)]
