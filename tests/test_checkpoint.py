"""Checkpoints: the file format, optimizer state, and resuming a run bit for bit after a crash,
Ctrl-C or SIGKILL; a write interrupted (even by SIGKILL) leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_at
from safetensors.torch import load_file, save_file

from implicit_diffusion.cli import main
from implicit_diffusion.errors import DataError, RunDirError
from implicit_diffusion.experiments import EXPERIMENTS, langevin_mixture
from implicit_diffusion.runtime.checkpoints import load_checkpoint, save_checkpoint
from implicit_diffusion.runtime.runner import execute, resume
from implicit_diffusion.serialization import load_optimizer_state, optimizer_state

SMALL = dict(num_particles=200, num_steps=600, eval_every=100, snapshot_steps=(0, 300, 600), progress=False,
             checkpoint_every=200)


def test_tensors_and_metadata_round_trip(tmp_path):
    path = tmp_path / "c.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "g": torch.Generator().manual_seed(3).get_state()}
    meta = {"step": 7, "lr": 0.1 + 0.2, "nested": {"xs": [1.5, None, True]}}
    save_checkpoint(path, tensors, meta)
    t, m = load_checkpoint(path)
    assert m == meta and m["lr"] == 0.1 + 0.2  # the float survives JSON exactly
    assert torch.equal(t["a"], tensors["a"]) and torch.equal(t["g"], tensors["g"])


@pytest.mark.parametrize("make", ["sgd-momentum", "adam"])
def test_a_restored_optimizer_continues_bit_for_bit(make, tmp_path):
    """Two optimizers stepped identically, one saved and reloaded into a fresh copy half-way:
    the parameters agree exactly afterwards (a reload without its state, the control, does not)."""
    def build():
        p = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        opt = (torch.optim.SGD([p], lr=0.1, momentum=0.9) if make == "sgd-momentum"
               else torch.optim.Adam([p], lr=0.05, betas=(0.8, 0.99)))
        return p, opt

    def steps(p, opt, k0, k1):
        for k in range(k0, k1):
            opt.zero_grad()
            ((p - k / 10) ** 2).sum().backward()
            opt.step()

    p, opt = build()
    steps(p, opt, 0, 5)
    save_checkpoint(tmp_path / "c.safetensors", *optimizer_state(opt))
    tensors, meta = load_checkpoint(tmp_path / "c.safetensors")
    q, opt_q = build()
    r, opt_r = build()
    with torch.no_grad():
        q.copy_(p)
        r.copy_(p)
    load_optimizer_state(opt_q, tensors, meta)
    steps(p, opt, 5, 12)
    steps(q, opt_q, 5, 12)
    steps(r, opt_r, 5, 12)  # control: same parameters, optimizer state lost
    assert torch.equal(p, q)
    assert not torch.equal(p, r)
    if make == "adam":
        assert opt_q.param_groups[0]["betas"] == (0.8, 0.99)


def test_bad_checkpoint_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, {"x": torch.ones(1000)}, {"step": 1})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(DataError, match="cannot be read"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(64))
    with pytest.raises(DataError, match="cannot be read"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(DataError, match="not an implicit-diffusion checkpoint"):
        load_checkpoint(foreign)
    older = tmp_path / "older.safetensors"  # before the run state was saved by part
    save_file({"x": torch.zeros(2)}, str(older),
              metadata={"format": "implicit-diffusion/checkpoint", "version": "1", "meta": "{}"})
    with pytest.raises(DataError, match="has version '1'; this release reads version 3"):
        load_checkpoint(older)


def _outputs(run_dir: Path) -> dict:
    """What a finished run leaves, minus wall times."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("wall_time_s")
    return {"metrics": (run_dir / "metrics.jsonl").read_bytes(), "summary": summary,
            "theta": load_file(str(run_dir / "theta.safetensors"))["theta"]}


def _assert_same_outputs(a: Path, b: Path) -> None:
    oa, ob = _outputs(a), _outputs(b)
    la, lb = oa["metrics"].splitlines(), ob["metrics"].splitlines()
    first = next((i for i, (x, y) in enumerate(zip(la, lb)) if x != y), None)
    assert la == lb, f"metrics differ: {len(la)} vs {len(lb)} lines, first difference at line {first}"
    assert oa["summary"] == ob["summary"]
    assert torch.equal(oa["theta"], ob["theta"]), (oa["theta"], ob["theta"])


@pytest.fixture
def reference(tmp_path):
    """An uninterrupted run of the SMALL config."""
    cfg = langevin_mixture.Config(**SMALL)
    execute(langevin_mixture, cfg, tmp_path / "reference", name="langevin-mixture")
    return tmp_path / "reference"


@pytest.mark.parametrize("sampler", ["ula", "mala", "primal-dual-box"])
def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, sampler, reference):
    """A crash at update 500 (after the checkpoint at 400, with metrics written past it) and a
    resume give the same metrics file, summary and θ as the uninterrupted run, bit for bit."""
    from implicit_diffusion.runtime import recording

    cfg = langevin_mixture.Config(**{**SMALL, "sampler": sampler})
    if sampler != "ula":
        reference = tmp_path / f"reference-{sampler}"
        execute(langevin_mixture, cfg, reference, name="langevin-mixture")
    run_dir = tmp_path / "crashed"
    with crash_at(recording.EvalRecorder, "record", 500), pytest.raises(RuntimeError, match="simulated crash"):
        execute(langevin_mixture, cfg, run_dir, name="langevin-mixture")
    saved, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert meta["step"] == 400
    assert ("sampler.dual" in saved) == (sampler == "primal-dual-box")  # the dual iterate is state too
    stale = run_dir / ".checkpoint.safetensors.abc123.tmp"  # as a SIGKILL during a write leaves
    stale.write_bytes(b"half a checkpoint")
    name, _, result, files = resume(run_dir, EXPERIMENTS)
    assert name == "langevin-mixture" and "theta.safetensors" in files
    assert not stale.exists()
    _assert_same_outputs(reference, run_dir)
    # the in-memory result carries the whole history, not only the resumed part
    lines = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert np.array_equal(result.rewards, np.array([r["reward"] for r in lines if "reward" in r]))
    assert list(result.eval_steps) == [r["step"] for r in lines if "exact_reward" in r]


def test_resume_refuses_what_it_cannot_continue(tmp_path, reference):
    with pytest.raises(RunDirError, match="is complete"):
        resume(reference, EXPERIMENTS)
    with pytest.raises(RunDirError, match="no checkpoint"):
        resume(tmp_path, EXPERIMENTS)
    with pytest.raises(RunDirError, match="does not exist"):
        resume(tmp_path / "nowhere", EXPERIMENTS)
    # an edited config no longer matches the checkpoint's
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in reference.iterdir():
        if f.name != "summary.json":  # as if it had crashed before the end
            (edited / f.name).write_bytes(f.read_bytes())
    text = (edited / "config.toml").read_text().replace("lr = 0.1", "lr = 0.2")
    (edited / "config.toml").write_text(text)
    with pytest.raises(RunDirError, match="differs from the config saved"):
        resume(edited, EXPERIMENTS)
    assert main(["resume", str(reference)]) == 2  # one-line error through the CLI


def test_a_run_directory_of_an_earlier_release_resumes_with_its_sentinels_read_as_none(tmp_path, reference):
    """Earlier releases wrote num_threads = 0 ("automatic") where the key now defaults to None; such a
    run directory (config.toml and the checkpoint's config alike) resumes to the uninterrupted result,
    while a new config with num_threads = 0 is refused (tests/test_config_hostile.py)."""
    from implicit_diffusion.runtime import recording

    run_dir = tmp_path / "older"
    with crash_at(recording.EvalRecorder, "record", 500), pytest.raises(RuntimeError, match="simulated crash"):
        execute(langevin_mixture, langevin_mixture.Config(**SMALL), run_dir, name="langevin-mixture")
    config = run_dir / "config.toml"
    assert "num_threads" not in config.read_text()  # None is omitted
    config.write_text(config.read_text() + "num_threads = 0\n")
    tensors, meta = load_checkpoint(run_dir / "checkpoint.safetensors")
    meta["config"]["num_threads"] = 0
    save_checkpoint(run_dir / "checkpoint.safetensors", tensors, meta)
    resume(run_dir, EXPERIMENTS)
    _assert_same_outputs(reference, run_dir)


# --- real processes: SIGKILL and Ctrl-C --------------------------------------------------------

LONG = ["--set", "num_particles=200", "--set", "num_steps=8000", "--set", "eval_every=1000",
        "--set", "snapshot_steps=[0, 4000]", "--checkpoint-every", "500", "--no-progress"]


def _start(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.Popen([sys.executable, "-m", "implicit_diffusion", "run", "langevin-mixture", *LONG,
                             "--out", str(run_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, at_least: int, timeout: float = 120) -> int:
    path, deadline = run_dir / "checkpoint.safetensors", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        if path.exists():
            try:
                step = load_checkpoint(path)[1]["step"]
            except DataError:  # pragma: no cover - the rename is atomic, so this must not happen
                raise
            if step >= at_least:
                return step
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    raise AssertionError("no checkpoint in time")


def _reference_long(tmp_path: Path) -> Path:
    ref = tmp_path / "reference-long"
    assert main(["run", "langevin-mixture", *LONG, "--out", str(ref)]) == 0
    return ref


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    run_dir = tmp_path / "killed"
    proc = _start(run_dir)
    step = _wait_for_checkpoint(proc, run_dir, 2000)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reaps it and closes its pipes
    assert proc.returncode == -signal.SIGKILL
    assert step < 8000
    assert main(["resume", str(run_dir)]) == 0
    _assert_same_outputs(_reference_long(tmp_path), run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["ctrl-c", "term", "hup"])
def test_a_stop_signal_writes_a_checkpoint_and_exits_cleanly_then_resumes(tmp_path, signum):
    """Ctrl-C, SIGTERM (schedulers) and SIGHUP (a closed terminal) alike: a checkpoint at the end of
    the current update, exit 128 + the signal, the resume command printed; resume is bit for bit."""
    run_dir = tmp_path / "interrupted"
    proc = _start(run_dir)
    step = _wait_for_checkpoint(proc, run_dir, 1000)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"interrupted by {signal.Signals(signum).name}".encode() in err
    assert b"continue with: implicit-diffusion resume" in err and b"Traceback" not in err
    saved = load_checkpoint(run_dir / "checkpoint.safetensors")[1]["step"]
    assert step <= saved < 8000  # written at the interruption, not only at the last multiple of 500
    assert main(["resume", str(run_dir)]) == 0
    _assert_same_outputs(_reference_long(tmp_path), run_dir)


WRITER = textwrap.dedent("""
    import sys, torch
    from implicit_diffusion.runtime.checkpoints import save_checkpoint
    path, i = sys.argv[1], 0
    while True:
        i += 1
        save_checkpoint(path, {"x": torch.full((2_000_000,), float(i))}, {"i": i})
""")


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    """A process rewriting an 8 MB checkpoint in a loop is killed at arbitrary moments: the file
    is always a complete checkpoint whose tensor matches its metadata."""
    path = tmp_path / "checkpoint.safetensors"
    for delay in (0.0, 0.05, 0.13, 0.31):
        path.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:  # its first checkpoint is complete
            time.sleep(0.005)
        time.sleep(delay)  # then kill it somewhere in a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tensors, meta = load_checkpoint(path)
        assert meta["i"] >= 1
        assert torch.equal(tensors["x"], torch.full((2_000_000,), float(meta["i"])))


def test_a_failing_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A write that dies half-way (here: the disk is full) raises, leaves the old checkpoint as it
    was and no temporary file behind."""
    import safetensors.torch

    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"x": torch.ones(10)}, {"step": 1})
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"x": torch.zeros(10)}, {"step": 2})
    assert path.read_bytes() == before
    assert load_checkpoint(path)[1]["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]


def test_a_full_disk_during_a_run_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """The disk fills up at the second checkpoint write: the command fails with one line (exit 1),
    the first checkpoint is intact and resumable."""
    import implicit_diffusion.runtime.checkpoints as ck

    calls = {"n": 0}
    real = ck.save_tensors

    def fills_up(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device", str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(ck, "save_tensors", fills_up)
    out = tmp_path / "run"
    rc = main(["run", "langevin-mixture", "--set", "num_particles=200", "--set", "num_steps=600",
               "--checkpoint-every", "200", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("implicit-diffusion: error: No space left on device") and "Traceback" not in err
    assert load_checkpoint(out / "checkpoint.safetensors")[1]["step"] == 200
    monkeypatch.setattr(ck, "save_tensors", real)
    assert main(["resume", str(out)]) == 0
