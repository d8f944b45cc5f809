"""The run machinery's shared parts: checkpoint state by part, packed records, recorders, config checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from implicit_diffusion.errors import ConfigError
from implicit_diffusion.runtime.checkpoints import NoCheckpoints, load_checkpoint, save_checkpoint
from implicit_diffusion.runtime.recording import EvalRecorder, RunningMean
from implicit_diffusion.runtime.state import load_state_of, pack, state_of, unpack
from implicit_diffusion.runtime.validation import check, nonnegative, one_of, positive


@dataclass
class Record:
    label: str
    count: int
    weight: float
    curve: np.ndarray
    evals: dict
    grids: list
    state: dict
    missing: None = None


def _record() -> Record:
    return Record("λ/β = 10", 3, float("nan"), np.array([1.5, -math.inf, np.nan]),
                  {"step": [0, 100], "reward": [0.1 + 0.2, 1e-300], "empty": []},
                  [(0, torch.arange(4.0)), (7, torch.ones(2, 2))], {"w.0": torch.randn(3), "b": torch.zeros(1)})


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    if isinstance(a, float):
        return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_pack_round_trips_a_record_through_a_checkpoint_file_bit_for_bit(tmp_path):
    """NaN and ±inf floats, ints, strings, None, arrays, tensors, dicts and (step, tensor) grids come
    back with their values and types, through the real file (whose JSON allows no NaN)."""
    rec = _record()
    tensors, tree = pack(rec, "run")
    assert all(name.startswith("run.") for name in tensors)
    save_checkpoint(tmp_path / "c.safetensors", tensors, {"tree": tree})
    loaded, meta = load_checkpoint(tmp_path / "c.safetensors")
    back = Record(**unpack(meta["tree"], loaded))
    assert all(_same(getattr(rec, f), getattr(back, f)) for f in rec.__dataclass_fields__)
    wrong = Record(**{**unpack(meta["tree"], loaded), "count": 4})  # the comparison itself can fail
    assert not _same(rec.count, wrong.count)


def test_pack_refuses_what_it_cannot_describe():
    with pytest.raises(TypeError, match="cannot pack a object"):
        pack({"x": object()}, "run")


def test_state_of_saves_and_restores_every_kind_of_part_in_place():
    """Module, optimizer (Adam's moments), LR scheduler, generator and a recorder: after training on
    from the saved state, a restored copy continues exactly like the original; without restoring
    the generator (the negative control) it does not."""
    def build():
        torch.manual_seed(0)  # the test's own modules: the layer init uses the global RNG
        net = torch.nn.Linear(3, 1)
        opt = torch.optim.Adam(net.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)
        return net, opt, sched, torch.Generator().manual_seed(1), RunningMean("loss")

    def steps(net, opt, sched, gen, mean, n):
        for k in range(n):
            x = torch.randn(8, 3, generator=gen)
            loss = net(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            mean(k, x, {"loss": loss.detach()})

    parts = build()
    steps(*parts, 5)
    names = ("net", "optimizer", "scheduler", "generator", "mean")
    tensors, meta = state_of(dict(zip(names, parts)), "run.")
    assert all(k.startswith("run.") for k in tensors) and set(meta) == {"optimizer", "scheduler", "mean", "generator"}
    assert meta["generator"] == {"device": "cpu"}  # the device type its stream belongs to
    steps(*parts, 4)

    restored = build()
    load_state_of(dict(zip(names, restored)), tensors, meta, "run.")
    steps(*restored, 4)
    assert torch.equal(parts[0].weight, restored[0].weight) and parts[4].mean() == restored[4].mean()

    control = build()
    load_state_of(dict(zip(names[:3], control[:3])), tensors, meta, "run.")  # the generator left fresh
    steps(*control, 4)
    assert not torch.equal(parts[0].weight, control[0].weight)


def test_state_of_refuses_unknown_parts():
    with pytest.raises(TypeError, match="part 'x': cannot save a int"):
        state_of({"x": 3})


def test_eval_recorder_evaluates_at_multiples_of_every_in_its_step_unit_and_at_the_end():
    """Steps counted in sampler steps (3 per update, every 4): evaluations where a multiple of 4 is
    crossed (after updates 2, 3, 4, 6 → steps 6, 9, 12, 18) and after the last update (7 → 21);
    snapshots at step 9 and at steps that are not evaluations (15)."""
    records = []
    rec = EvalRecorder(lambda done, x: {"m": float(x.sum()), "v": np.array([done, 1.0])}, 4, 7, records.extend,
                       steps_per_update=3, step_key="sampler_steps", labels={"method": "a"},
                       snapshot=lambda done, x: (x.clone(), np.full(2, done)), snapshot_steps={9, 15})
    rec.record(0, torch.zeros(2))
    for k in range(7):
        rec(k, torch.full((2,), float(k)), {})
    assert rec.steps == [0, 6, 9, 12, 18, 21]
    assert rec.values["m"] == [0.0, 2.0, 4.0, 6.0, 10.0, 12.0]
    assert records[1] == {"method": "a", "sampler_steps": 6, "m": 2.0, "v": [6.0, 1.0]}
    assert sorted(rec.snapshots) == [9, 15] and torch.equal(rec.snapshots[15][0], torch.full((2,), 4.0))
    assert rec.column("v").shape == (6, 2)

    tensors, meta = rec.state("evals")
    again = EvalRecorder(rec.measure, 4, 7, records.extend, steps_per_update=3)
    again.load_state(tensors, meta, "evals")
    assert again.steps == rec.steps and _same(again.values, rec.values) and _same(again.snapshots, rec.snapshots)


def test_running_mean_and_no_checkpoints():
    mean = RunningMean("acceptance_rate")
    assert mean.mean() is None
    for k, r in enumerate([0.5, None, 1.0]):
        mean(k, None, {} if r is None else {"acceptance_rate": torch.tensor(r)})
    assert mean.mean() == 0.75
    none = NoCheckpoints()
    assert none.start == 0 and none.resumed is None
    with none.catch_interrupts():
        none.callback(lambda done, x: pytest.fail("NoCheckpoints saved a state"))(9, None, {})


@dataclass(frozen=True)
class _Cfg:
    lr: float = 0.1
    num_threads: int = 0
    kind: str = "a"


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_config_checks_reject_bad_values_nan_included(value):
    with pytest.raises(ConfigError, match=f"config key 'lr' must be > 0, got {value!r}"):
        positive(_Cfg(lr=value), "lr")


def test_config_checks_messages():
    positive(_Cfg(), "lr")
    nonnegative(_Cfg(), "num_threads", note="(0 = automatic)")
    with pytest.raises(ConfigError, match=r"'num_threads' must be >= 0 \(0 = automatic\), got -1"):
        nonnegative(_Cfg(num_threads=-1), "num_threads", note="(0 = automatic)")
    with pytest.raises(ConfigError, match="config key 'kind': unknown 'c'; allowed: a, b"):
        one_of(_Cfg(kind="c"), "kind", ("a", "b"))
    with pytest.raises(ConfigError, match="'lr' must be < 1, got 2.0"):
        check(_Cfg(lr=2.0), "lr", lambda v: v < 1, "< 1")


def test_status_says_what_a_long_step_does_and_how_long_it_took(capsys):
    from implicit_diffusion.runtime.progress import status

    with status("evaluating the pretrained model (4 samples, 2 steps)"):
        sum(range(10_000))
    err = capsys.readouterr().err
    assert err.startswith("implicit-diffusion: evaluating the pretrained model (4 samples, 2 steps)… ")
    assert err.rstrip().endswith(" s") and ", CPU " in err and err.count("\n") == 1
    with pytest.raises(ZeroDivisionError), status("dividing"):
        1 / 0
    assert capsys.readouterr().err == "implicit-diffusion: dividing… stopped\n"
    with status("quiet", enabled=False):
        pass
    assert capsys.readouterr().err == ""
