"""benchmarks/gpu.py on the CPU: its smoke settings are valid configs, its ratios and reach times
are right on hand-made rows, its Langevin loop runs, and a missing GPU is a one-line exit 2."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from implicit_diffusion.experiments import EXPERIMENTS, pretrain
from implicit_diffusion.runtime.config import build_config, parse_overrides

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _sets(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def test_smoke_jobs_cover_every_experiment_with_valid_small_configs(gpu):
    jobs = gpu.smoke_jobs("cpu")
    names = {j["name"] for j in jobs}
    assert {*EXPERIMENTS, "pretrain digits"} <= names
    for job in jobs:
        args = job["args"]
        assert args[args.index("--device") + 1] == "cpu" and "--no-progress" in args
        assert job["dropped"] == [], f"{job['name']}: settings its config lacks: {job['dropped']}"
        module = pretrain if args[0] == "pretrain" else EXPERIMENTS[args[1]]
        sources = [{"dataset": args[1]}] if args[0] == "pretrain" else []
        if "--dtype" in args:
            sources.append({"dtype": args[args.index("--dtype") + 1]})
        config = build_config(module.Config, *sources, parse_overrides(_sets(args)))  # raises if invalid
        for key in ("num_steps", "num_updates"):  # a few steps, not the paper's thousands
            assert getattr(config, key, 0) <= 20
    bf16 = [j for j in jobs if j["name"].endswith("bfloat16")]
    assert {j["name"] for j in bf16} == {f"{n} bfloat16" for n in gpu.BFLOAT16_SMOKE}
    assert all("skip" in j or j["args"][-2:] == ["--dtype", "bfloat16"] for j in bf16)


def test_time_to_reach_interpolates_the_first_crossing(gpu):
    curve = [[0.0, -1.0], [2.0, 0.0], [4.0, 1.0], [6.0, 0.5]]
    assert gpu.time_to_reach(curve, -0.5) == pytest.approx(1.0)
    assert gpu.time_to_reach(curve, 0.75) == pytest.approx(3.5)
    assert gpu.time_to_reach(curve, -2.0) == 0.0
    assert gpu.time_to_reach(curve, 1.5) is None


def _row(name, tpu, peak, curve):
    return {"algorithm": name, "M": 50, "time_per_update_s": tpu, "peak_mib": peak, "updates": 10,
            "curve": curve, "initial_reward": curve[0][1], "final_reward": curve[-1][1]}


def test_queue_ratios_against_nested_autograd_and_the_target(gpu):
    rows = [_row("nested-autograd", 1.0, 100.0, [[0.0, 0.0], [20.0, 1.0]]),
            _row("queue-pipelined", 0.1, 80.0, [[0.0, 0.0], [2.0, 0.5], [4.0, 1.5], [20.0, 2.0]]),
            _row("queue-pipelined-chunked", 0.2, 120.0, [[0.0, 0.0], [2.0, 1.0], [20.0, 2.0]]),
            _row("nested-adjoint", 0.5, 10.0, [[0.0, 0.0], [20.0, 0.5]])]
    by = {e["algorithm"]: e for e in gpu.queue_ratios(rows)}
    assert by["queue-pipelined"]["speedup"] == pytest.approx(10.0)
    assert by["queue-pipelined"]["memory_ratio"] == pytest.approx(0.8)
    assert by["queue-pipelined"]["reach_fraction"] == pytest.approx(3.0 / 20.0)  # 1.0 reached at t = 3
    assert by["queue-pipelined"]["target_met"] is True
    assert by["queue-pipelined-chunked"]["target_met"] is False  # reaches in 0.1 but with 1.2× the memory
    assert by["nested-adjoint"]["reach_fraction"] is None and "target_met" not in by["nested-adjoint"]


def test_langevin_loop_runs_on_the_cpu(gpu):
    r = gpu.langevin_throughput(500, 4, 2, "cpu")
    assert r["steps"] == 4 and r["particle_steps_per_s"] > 0 and r["finite"]
    assert math.isclose(sum(r["weights_final"]), 1.0, rel_tol=1e-9) and 0 <= r["reward_mean_last"] <= 0.4


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_missing_cuda_is_one_line_and_exit_2():
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and "CUDA is not available" in p.stderr
