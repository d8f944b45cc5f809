"""Checkpoints a hostile (or unlucky) user hands to ``resume``: the right format tag but wrong
contents, another run's checkpoint, training data or starting weights changed since the kill, a
full disk reported by safetensors itself; and a resume with Adam and a non-constant learning-rate
schedule, bit for bit (with controls showing that the comparison catches a lost optimizer or
scheduler state). Every refusal is one line, a DataError naming the checkpoint, before anything
runs."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_at
from safetensors.torch import load_file, save_file

from implicit_diffusion.cli import main
from implicit_diffusion.errors import DataError
from implicit_diffusion.experiments import EXPERIMENTS, diffusion_finetune, ebm, langevin_mixture, pretrain
from implicit_diffusion.runtime import recording
from implicit_diffusion.runtime.checkpoints import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from implicit_diffusion.runtime.runner import execute, resume
from implicit_diffusion.runtime.state import check_state_of, fingerprint

JOBS = {**EXPERIMENTS, "pretrain": pretrain}
# Adam and the inverse-sqrt schedule: a resume must carry both moments and the scheduler's step
TINY = dict(num_particles=20, num_steps=40, eval_every=10, snapshot_steps=(0, 40), progress=False,
            checkpoint_every=20, optimizer="adam", lr_schedule="inverse-sqrt", lr=0.3)


def _crash_langevin(run_dir: Path, config: langevin_mixture.Config, at: int = 30) -> None:
    """Run until the evaluation at ``at`` raises (after the checkpoint at 20, metrics written past it)."""
    with crash_at(recording.EvalRecorder, "record", at), pytest.raises(RuntimeError, match="simulated crash"):
        execute(langevin_mixture, config, run_dir, name="langevin-mixture")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted TINY run and one crashed at update 30 (its checkpoint is at 20)."""
    base = tmp_path_factory.mktemp("hostile")
    cfg = langevin_mixture.Config(**TINY)
    execute(langevin_mixture, cfg, base / "reference", name="langevin-mixture")
    _crash_langevin(base / "crashed", cfg)
    return {"reference": base / "reference", "crashed": base / "crashed"}


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _edited(run: Path, to: Path, edit) -> Path:
    """A copy of the crashed run whose checkpoint went through ``edit(tensors, meta) -> (tensors, meta)``."""
    run_dir = _copy(run, to)
    path = run_dir / CHECKPOINT_FILE
    tensors, meta = edit(*load_checkpoint(path))
    save_checkpoint(path, tensors, meta)
    return run_dir


def _set(meta: dict, dotted: str, value) -> dict:
    *head, last = dotted.split(".")
    node = meta
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return meta


_DELETE = object()


def _meta(dotted: str, value):
    return lambda t, m: (t, _set(m, dotted, value))


def _tensor(name: str, change):
    def edit(t, m):
        t = dict(t)
        if change is _DELETE:
            del t[name]
        else:
            t[name] = change(t.get(name))
        return t, m
    return edit


def _drop_adam_moment(t, m):
    t = {k: v for k, v in t.items() if k != "optimizer.0.exp_avg"}
    m["state"]["optimizer"]["tensor_keys"].remove("optimizer.0.exp_avg")  # a consistent-looking record
    return t, m


HOSTILE = {
    # the record's schema
    "missing-step": (_meta("step", _DELETE), r"meta 'step' is missing"),
    "missing-metrics-offset": (_meta("metrics_offset", _DELETE), r"meta 'metrics_offset' is missing"),
    "step-not-a-number": (_meta("step", "abc"), r"meta 'step' must be an integer >= 0, got 'abc'"),
    "step-a-boolean": (_meta("step", True), r"meta 'step' must be an integer >= 0, got True"),
    "step-negative": (_meta("step", -5), r"meta 'step' must be an integer >= 0, got -5"),
    "step-past-the-end": (_meta("step", 41), r"meta 'step' must be an integer from 0 to 40, got 41"),
    "metrics-offset-negative": (_meta("metrics_offset", -1), r"meta 'metrics_offset' must be an integer >= 0"),
    "state-a-list": (_meta("state", []), r"meta 'state' must be a JSON object, got a JSON array"),
    "config-a-string": (_meta("config", "x"), r"meta 'config' must be a JSON object, got a JSON string"),
    "meta-a-list": (lambda t, m: (t, [m]), r"its metadata must be a JSON object, got a JSON array"),
    "unknown-experiment": (_meta("experiment", "nope"), r"meta 'experiment' is 'nope', not a known experiment"),
    "experiment-a-number": (_meta("experiment", 3), r"meta 'experiment' must be a string"),
    "fingerprints-not-strings": (_meta("data", {"x": 1}), r"meta 'data' must map names to fingerprints"),
    # tensors against the live objects
    "missing-tensor": (_tensor("potential.logits", _DELETE), r"tensor 'potential.logits' is missing"),
    "extra-tensor": (_tensor("bogus", lambda _: torch.zeros(1)), r"unexpected tensor 'bogus'"),
    "extra-module-entry": (_tensor("potential.extra", lambda _: torch.zeros(1)),
                           r"unexpected tensor 'potential.extra' \(the run's 'potential' has no such entry\)"),
    "wrong-shape": (_tensor("potential.logits", lambda v: v[:3]),
                    r"tensor 'potential.logits' has shape \(3,\), the run's is \(6,\)"),
    "wrong-dtype": (_tensor("potential.logits", lambda v: v.double()),
                    r"tensor 'potential.logits' has dtype torch.float64, the run's is torch.float32"),
    "particles-of-another-shape": (_tensor("particles", lambda v: v[:10]),
                                   r"tensor 'particles' has shape \(10, 2\), the run's is \(20, 2\)"),
    "generator-state-of-the-wrong-size": (_tensor("generator.0", lambda v: v[:100]),
                                          r"tensor 'generator.0' is not the state of a cpu random generator"),
    "generator-record-a-string": (lambda t, m: (t, {**m, "state": {**m["state"], "generator.0": "cpu"}}),
                                  r"meta 'generator.0' must be a generator's record"),
    "adam-moment-missing": (_tensor("optimizer.0.exp_avg", _DELETE), r"tensor 'optimizer.0.exp_avg' is missing"),
    "adam-moment-dropped-from-the-record-too": (_drop_adam_moment, r"optimizer state 'optimizer' is incomplete"),
    "adam-moment-of-another-shape": (_tensor("optimizer.0.exp_avg_sq", lambda v: v[:2]),
                                     r"tensor 'optimizer.0.exp_avg_sq' has shape \(2,\), the run's is \(6,\)"),
    "optimizer-groups-missing": (_meta("state.optimizer.param_groups", []), r"1 parameter group\(s\) of sizes \[1\]"),
    "optimizer-record-missing": (_meta("state.optimizer", _DELETE), r"meta 'optimizer' is missing"),
    "scheduler-record-a-list": (_meta("state.lr_scheduler", [1]), r"learning-rate scheduler's record"),
    "scheduler-epoch-a-string": (_meta("state.lr_scheduler.last_epoch", "x"),
                                 r"meta 'lr_scheduler.last_epoch' must be an integer"),
    "recorder-record-empty": (_meta("state.rewards", {}), r"meta 'rewards' must have the keys count.*\(missing: count"),
    "recorder-count-a-string": (_meta("state.rewards.count", "7"),
                                r"meta 'rewards.count' must be an integer, got a string"),
    "optimizer-lr-a-string": (_meta("state.optimizer.param_groups.0.lr", "abc"),
                              r"meta 'optimizer.param_groups.0.lr' must be a number, got a string"),
    "scheduler-base-lr-a-string": (_meta("state.lr_scheduler.base_lrs", ["x"]),
                                   r"meta 'lr_scheduler.base_lrs.0' must be a number, got a string"),
    "recorder-of-another-length": (_tensor("rewards", lambda v: v[:5]), r"part 'rewards' cannot be restored"),
    "recorder-of-another-dtype": (_tensor("rewards", lambda v: v.double()),
                                  r"tensor 'rewards' has dtype torch.float64, the run's is torch.float32"),
    "packed-record-malformed": (_meta("state.evals.packed", ["dict", 5]), r"part 'evals': malformed packed dict"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_checkpoint_with_wrong_contents_is_a_one_line_data_error(case, runs, tmp_path):
    edit, message = HOSTILE[case]
    run_dir = _edited(runs["crashed"], tmp_path / "run", edit)
    before = (run_dir / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(DataError, match=message) as caught:
        resume(run_dir, EXPERIMENTS)
    text = str(caught.value)
    assert str(run_dir / CHECKPOINT_FILE) in text and "\n" not in text, text
    assert (run_dir / CHECKPOINT_FILE).read_bytes() == before  # the file is not touched
    assert not (run_dir / "summary.json").exists()


def test_through_the_cli_a_bad_checkpoint_is_exit_2_with_one_line(runs, tmp_path, capsys):
    run_dir = _edited(runs["crashed"], tmp_path / "run", _tensor("potential.logits", lambda v: v[:3]))
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("implicit-diffusion: error: checkpoint ") and err.count("\n") == 1
    assert "has shape (3,), the run's is (6,)" in err and "Traceback" not in err


def test_the_unedited_checkpoint_resumes(runs, tmp_path):
    """The control of the cases above: the same copy, re-saved without an edit, resumes."""
    run_dir = _edited(runs["crashed"], tmp_path / "run", lambda t, m: (t, m))
    assert resume(run_dir, EXPERIMENTS)[0] == "langevin-mixture"


def test_the_check_names_only_what_the_live_objects_would_not_take():
    """check_state_of without a file: a state saved from objects of the same shapes passes; a module of
    another width, a generator of another kind, an optimizer of another size do not."""
    net, g = torch.nn.Linear(3, 2), torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    from implicit_diffusion.runtime.state import state_of

    tensors, meta = state_of({"net": net, "opt": opt, "g": g})
    check_state_of({"net": torch.nn.Linear(3, 2), "opt": opt, "g": g}, tensors, meta)
    with pytest.raises(DataError, match=r"tensor 'net.weight' has shape \(2, 3\), the run's is \(4, 3\)"):
        check_state_of({"net": torch.nn.Linear(3, 4)}, tensors, meta, exhaustive=False)
    wide = torch.nn.Linear(3, 4)
    with pytest.raises(DataError, match=r"'opt.0.exp_avg' has shape \(2, 3\), the run's is \(4, 3\)"):
        check_state_of({"opt": torch.optim.Adam(wide.parameters())}, tensors, meta, exhaustive=False)
    with pytest.raises(DataError, match="meta 'g' must be a generator's record"):
        check_state_of({"g": g}, tensors, {"g": 3}, exhaustive=False)


# --- another run's checkpoint -----------------------------------------------------------------------

PRETRAIN = dict(dataset="images", num_steps=12, batch_size=4, base_channels=8, channel_mults=(1,),
                num_samples=2, sampling_steps=2, progress=False, checkpoint_every=4)


def _crash_pretrain(config: pretrain.Config, run_dir: Path, at: int = 6) -> None:
    with crash_at(pretrain._LossLog, "__call__", at), pytest.raises(RuntimeError, match="simulated crash"):
        execute(pretrain, config, run_dir, name="pretrain")


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory) -> tuple[Path, Path]:
    """A pretrain run on an 8-image .npy file, crashed at step 6 (checkpoint at 4); (run dir, data file)."""
    base = tmp_path_factory.mktemp("pretrain")
    images = np.random.default_rng(0).integers(0, 256, size=(8, 4, 4), dtype=np.uint8)
    data = base / "images.npy"
    np.save(data, images)
    _crash_pretrain(pretrain.Config(**PRETRAIN, data=str(data)), base / "crashed")
    return base / "crashed", data


def test_another_experiments_checkpoint_in_a_run_directory_says_so(runs, pretrain_run, tmp_path):
    """A langevin-mixture checkpoint copied into a pretrain run directory: named, not a config error."""
    run_dir = _copy(pretrain_run[0], tmp_path / "run")
    shutil.copyfile(runs["crashed"] / CHECKPOINT_FILE, run_dir / CHECKPOINT_FILE)
    with pytest.raises(DataError, match=r"is of experiment 'langevin-mixture', but the run in .* is of 'pretrain' "
                                        r"\(its run.json\): it is another run's checkpoint"):
        resume(run_dir, JOBS)


# --- the data (or weights) a run started from --------------------------------------------------------

def test_pretraining_data_changed_since_the_kill_are_refused(pretrain_run, tmp_path):
    run_dir = _copy(pretrain_run[0], tmp_path / "run")
    data = pretrain_run[1]
    original = data.read_bytes()
    images = np.load(data)
    images[3, 2, 2] ^= 1  # one pixel
    try:
        np.save(data, images)
        with pytest.raises(DataError, match=r"^the training data differ from the run's: fingerprint [0-9a-f]{16} "
                                            rf"at the checkpoint, [0-9a-f]{{16}} now \({data}\)$"):
            resume(run_dir, JOBS)
    finally:
        data.write_bytes(original)
    assert resume(run_dir, JOBS)[0] == "pretrain"  # the control: the run's own data resume


def test_a_checkpoint_without_the_data_fingerprint_is_refused(pretrain_run, tmp_path):
    run_dir = _edited(pretrain_run[0], tmp_path / "run", _meta("data", {}))
    with pytest.raises(DataError, match="has no fingerprint of the training data"):
        resume(run_dir, JOBS)


def test_a_pretrain_checkpoint_with_wrong_contents_is_refused(pretrain_run, tmp_path):
    """The trainer's own record (model, EMA, Adam, generator, losses) is checked like the parts above."""
    def shorter_losses(t, m):
        return {**t, "trainer.losses": t["trainer.losses"][:2]}, m

    run_dir = _edited(pretrain_run[0], tmp_path / "a", shorter_losses)
    with pytest.raises(DataError, match=r"tensor 'trainer.losses' has shape \(2,\), the run's is \(4,\)"):
        resume(run_dir, JOBS)
    run_dir = _edited(pretrain_run[0], tmp_path / "b", _meta("state.trainer", []))
    with pytest.raises(DataError, match=r"meta 'state.trainer' must be a JSON object, got a JSON array"):
        resume(run_dir, JOBS)


def test_ebm_data_changed_since_the_kill_are_refused(tmp_path, monkeypatch):
    """ebm's data are built in (made from the seed): a changed generator of them (another release of a
    data package) is what the fingerprint catches."""
    cfg = ebm.Config(num_train=60, num_heldout=40, num_particles=20, batch_size=20, num_steps=6, hidden=8,
                     eval_every=3, fresh_steps=2, progress=False, checkpoint_every=2, compare=False)
    with crash_at(recording.EvalRecorder, "record", 3), pytest.raises(RuntimeError, match="simulated crash"):
        execute(ebm, cfg, tmp_path / "run", name="ebm")
    real = ebm.train_heldout

    def shifted(*args, **kwargs):
        train, heldout = real(*args, **kwargs)
        return train + 1e-3, heldout

    monkeypatch.setattr(ebm, "train_heldout", shifted)
    with pytest.raises(DataError, match=r"^the training data differ from the run's: .* \(data set '"):
        resume(tmp_path / "run", EXPERIMENTS)
    monkeypatch.setattr(ebm, "train_heldout", real)
    # the experiment's own record is checked too
    bad = _edited(tmp_path / "run", tmp_path / "bad-method", _meta("state.method", "xyz"))
    with pytest.raises(DataError, match=r"meta 'state.method' is 'xyz'; this run trains 'single'"):
        resume(bad, EXPERIMENTS)
    bad = _edited(tmp_path / "run", tmp_path / "bad-seconds", _meta("state.train_seconds", "1"))
    with pytest.raises(DataError, match=r"meta 'state.train_seconds' must be a JSON number, got a JSON string"):
        resume(bad, EXPERIMENTS)
    assert resume(tmp_path / "run", EXPERIMENTS)[0] == "ebm"


def test_finetuning_from_a_model_file_changed_since_the_kill_is_refused(tmp_path, monkeypatch):
    """diffusion-finetune starts from a model file: its weights are fingerprinted like data."""
    from safetensors import safe_open

    model = tmp_path / "model.safetensors"
    assert main(["pretrain", "digits", "--set", "num_steps=2", "--set", "base_channels=8", "--set", "num_samples=2",
                 "--set", "sampling_steps=2", "--set", "channel_mults=[1, 2]", "--no-progress",
                 "--out", str(tmp_path / "pre")]) == 0
    shutil.copyfile(tmp_path / "pre" / "model.safetensors", model)
    cfg = diffusion_finetune.Config(model=str(model), num_steps=6, num_sampling_steps=2, batch_size=2, eval_every=3,
                                    eval_samples=2, grid_images=2, progress=False, checkpoint_every=2)
    real, calls = diffusion_finetune.sample_images, {"n": 0}

    def crashing(*args, **kwargs):  # grids at 0, 2, 4, 6: the third raises, after the checkpoint at 4
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(diffusion_finetune, "sample_images", crashing)
        with pytest.raises(RuntimeError, match="simulated crash"):
            execute(diffusion_finetune, cfg, tmp_path / "run", name="diffusion-finetune")
    original = model.read_bytes()
    with safe_open(str(model), framework="pt") as f:
        header = f.metadata()
    weights = load_file(str(model))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-3
    save_file(weights, str(model), metadata=header)
    with pytest.raises(DataError, match=rf"^the starting model's weights differ from the run's: .* \({model}\)$"):
        resume(tmp_path / "run", EXPERIMENTS)
    model.write_bytes(original)
    bad = _edited(tmp_path / "run", tmp_path / "bad-index", _meta("state.run_index", 3))
    with pytest.raises(DataError, match=r"meta 'state.run_index' must be the number of finished runs \(0\)"):
        resume(bad, EXPERIMENTS)
    bad = _edited(tmp_path / "run", tmp_path / "bad-theta", lambda t, m: (
        {**t, **{k: v[:1] for k, v in t.items() if k.startswith("run.algo.model.") and v.ndim}}, m))
    with pytest.raises(DataError, match=r"tensor 'run.algo.model\..*' has shape \(1,"):
        resume(bad, EXPERIMENTS)
    assert resume(tmp_path / "run", EXPERIMENTS)[0] == "diffusion-finetune"


def test_a_fingerprint_covers_values_shape_and_dtype():
    x = torch.arange(6.0)
    assert fingerprint(x) == fingerprint(x.clone())
    assert len({fingerprint(x), fingerprint(x.reshape(2, 3)), fingerprint(x.double()),
                fingerprint(torch.cat([x[:5], torch.tensor([5.5])])), fingerprint({"a": x}),
                fingerprint({"b": x})}) == 6
    assert fingerprint(x.to(torch.bfloat16)) != fingerprint(x.half())


# --- a full disk, as safetensors reports it ------------------------------------------------------------

def _safetensors_enospc(path: str):
    from safetensors import SafetensorError

    return SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) '
                           f'at path "{path}"')


def test_save_tensors_turns_safetensors_io_errors_into_os_errors(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from implicit_diffusion.serialization import save_tensors

    def full(tensors, filename, metadata=None):
        raise _safetensors_enospc(filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "x.safetensors"
    with pytest.raises(OSError) as caught:
        save_tensors(target, {"a": torch.ones(2)})
    e = caught.value
    assert type(e) is OSError and e.errno == errno.ENOSPC and e.strerror == "No space left on device"
    assert e.filename == str(target) and isinstance(e.__cause__, SafetensorError)
    assert list(tmp_path.iterdir()) == []  # no temporary file left

    def bad(tensors, filename, metadata=None):  # not an I/O failure: stays what it is
        raise SafetensorError("invalid tensor")

    monkeypatch.setattr(safetensors.torch, "save_file", bad)
    with pytest.raises(SafetensorError, match="invalid tensor"):
        save_tensors(target, {"a": torch.ones(2)})


def test_a_full_disk_reported_by_safetensors_is_one_line_exit_1_and_keeps_the_checkpoint(tmp_path, monkeypatch,
                                                                                        capsys):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, {"n": 0}

    def fills_up(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            with open(filename, "wb") as f:
                f.write(b"\0" * 10)
            raise _safetensors_enospc(filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    out = tmp_path / "run"
    rc = main(["run", "langevin-mixture", "--set", "num_particles=20", "--set", "num_steps=60",
               "--set", "eval_every=10", "--checkpoint-every", "20", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert err == f"implicit-diffusion: error: No space left on device ({out / CHECKPOINT_FILE})\n"
    assert load_checkpoint(out / CHECKPOINT_FILE)[1]["step"] == 20  # the previous checkpoint survived
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main(["resume", str(out)]) == 0


# --- Adam and a learning-rate schedule, resumed bit for bit -------------------------------------------

def _outputs(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_time_s")
    return {"metrics": (run_dir / "metrics.jsonl").read_bytes(), "summary": summary,
            "theta": load_file(str(run_dir / "theta.safetensors"))["theta"]}


def _same(a: Path, b: Path) -> bool:
    oa, ob = _outputs(a), _outputs(b)
    return oa["metrics"] == ob["metrics"] and oa["summary"] == ob["summary"] and torch.equal(oa["theta"], ob["theta"])


def test_adam_with_an_lr_schedule_resumes_bit_for_bit(runs, tmp_path):
    run_dir = _copy(runs["crashed"], tmp_path / "run")
    tensors, meta = load_checkpoint(run_dir / CHECKPOINT_FILE)
    assert meta["step"] == 20 and "optimizer.0.exp_avg" in tensors and meta["state"]["lr_scheduler"]["last_epoch"] == 20
    resume(run_dir, EXPERIMENTS)
    assert _same(runs["reference"], run_dir)


def _fresh_optimizer(t, m):
    """Adam's moments and step count lost (a consistent record: as if the optimizer were new)."""
    t = {k: v for k, v in t.items() if not k.startswith("optimizer.")}
    m["state"]["optimizer"].update(state={}, tensor_keys=[])
    return t, m


def _fresh_scheduler(t, m):
    """The schedule back at its start (lr 0.3 again instead of 0.3 / sqrt(21))."""
    m["state"]["lr_scheduler"].update(last_epoch=0, _step_count=1, _last_lr=[0.3])
    return t, m


@pytest.mark.parametrize("lost", ["optimizer", "scheduler"])
def test_control_a_resume_that_loses_the_optimizer_or_scheduler_state_differs(lost, runs, tmp_path):
    """The comparison above catches a resume that forgets Adam's moments or the schedule's position: such
    a state passes every check (it is a valid fresh state) and the run ends elsewhere."""
    edit = _fresh_optimizer if lost == "optimizer" else _fresh_scheduler
    run_dir = _edited(runs["crashed"], tmp_path / "run", edit)
    resume(run_dir, EXPERIMENTS)
    assert not _same(runs["reference"], run_dir)
