"""One process per run directory (runtime/lock.py), and resume never lengthens the metrics file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from implicit_diffusion.cli import main
from implicit_diffusion.errors import RunDirError
from implicit_diffusion.experiments import langevin_mixture
from implicit_diffusion.runtime.lock import LOCK_FILE, RunDirLock
from implicit_diffusion.runtime.runner import execute

SMALL = dict(num_particles=100, num_steps=400, eval_every=100, snapshot_steps=(0, 400), progress=False,
             checkpoint_every=100)


@pytest.fixture
def crashed(tmp_path) -> Path:
    """A finished run with its summary removed: as if it had crashed after its last checkpoint."""
    run_dir = tmp_path / "run"
    execute(langevin_mixture, langevin_mixture.Config(**SMALL), run_dir, name="langevin-mixture")
    (run_dir / "summary.json").unlink()
    return run_dir


def test_a_held_lock_refuses_a_second_holder_naming_the_pid(tmp_path):
    with RunDirLock(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirError, match=rf"in use by another process \(PID {os.getpid()}\)"):
            RunDirLock(tmp_path).__enter__()
    with RunDirLock(tmp_path):  # released: taken again
        pass


def test_resume_of_a_run_in_use_is_one_line_and_changes_nothing(crashed, capsys):
    before = (crashed / "metrics.jsonl").read_bytes()
    with RunDirLock(crashed):
        assert main(["resume", str(crashed)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in use by another process (PID {os.getpid()})" in err
    assert (crashed / "metrics.jsonl").read_bytes() == before
    assert main(["resume", str(crashed)]) == 0  # the control: free, it resumes


@pytest.mark.parametrize("cut", ["emptied", "shortened"])
def test_resume_never_pads_the_metrics_with_nul_bytes(crashed, cut, capsys):
    metrics = crashed / "metrics.jsonl"
    data = metrics.read_bytes()
    metrics.write_bytes(b"" if cut == "emptied" else data[: len(data) // 3])
    size = metrics.stat().st_size
    assert main(["resume", str(crashed)]) == 2
    assert "fewer than the" in capsys.readouterr().err
    assert metrics.stat().st_size == size and b"\0" not in metrics.read_bytes()


def test_the_lock_dies_with_its_process(tmp_path):
    """A SIGKILLed holder leaves no stale lock (the kernel drops it)."""
    code = (f"from implicit_diffusion.runtime.lock import RunDirLock\nimport time\n"
            f"with RunDirLock({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"held"
    with pytest.raises(RunDirError, match=f"PID {proc.pid}"):
        RunDirLock(tmp_path).__enter__()
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    deadline = time.monotonic() + 10
    while True:
        try:
            with RunDirLock(tmp_path):
                break
        except RunDirError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_run_holds_the_lock_while_it_runs(tmp_path, monkeypatch):
    run_dir, seen = tmp_path / "run", []
    original = langevin_mixture.run

    def run(config, *, metrics_sink=None, checkpoints=None):
        with pytest.raises(RunDirError, match=f"PID {os.getpid()}") as e:
            RunDirLock(run_dir).__enter__()
        seen.append(str(e.value))
        return original(config, metrics_sink=metrics_sink, checkpoints=checkpoints)

    monkeypatch.setattr(langevin_mixture, "run", run)
    execute(langevin_mixture, langevin_mixture.Config(**SMALL), run_dir, name="langevin-mixture")
    assert len(seen) == 1
    with RunDirLock(run_dir):  # released when the run is done
        pass
