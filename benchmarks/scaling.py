"""Throughput of the §5.1 Langevin experiment with 1 vs 2 processes, side by side in one run.

    python benchmarks/scaling.py [--particles 1000000] [--steps 200] [--out FILE.json]

Runs ``implicit-diffusion run langevin-mixture`` at ``--particles`` particles in 2 particle
blocks (so every configuration uses the same random numbers and the same result):

- one process, 1 thread;
- one process, 2 threads;
- ``torchrun --nproc_per_node 2`` (gloo on CPU, NCCL on GPU), 1 thread each, particles sharded.

and reports the single loop's wall time (from the run's summary.json: the loop only, not start-up
or plotting), particle-steps per second and the ratio to the first row. (The experiment runs
on the CPU; a GPU row needs a device option it does not have yet.) Results go to
``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def run(cmd_prefix: list[str], args: list[str], threads: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MPLBACKEND": "Agg"}
    cmd = [*cmd_prefix, "run", "langevin-mixture", *args, "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--particles", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=str(HERE / "results" / "scaling.json"))
    a = p.parse_args()
    args = ["--set", f"num_particles={a.particles}", "--set", f"num_steps={a.steps}", "--set", "particle_blocks=2",
            "--set", f"eval_every={a.steps}", "--set", "snapshot_steps=[0]", "--set", "num_threads=None",
            "--no-progress"]
    single = [sys.executable, "-m", "implicit_diffusion"]
    sharded = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "implicit_diffusion"]
    configs = [("1 process, 1 thread", single, 1), ("1 process, 2 threads", single, 2),
               ("2 processes (gloo), 1 thread each", sharded, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for i, (label, prefix, threads) in enumerate(configs):
            s = run(prefix, args, threads, Path(d) / f"run{i}")
            rows.append({"config": label, "loop_s": s["wall_time_s"], "theta_weights": s["weights_final"]})
            print(f"done: {label}", flush=True)
    base = rows[0]["loop_s"]
    print(f"\nlangevin-mixture single loop, {a.particles:,} particles, {a.steps} steps, ULA, float32")
    print(f"{'configuration':<36}{'loop s':>10}{'particle-steps/s':>20}{'speed-up':>10}")
    for r in rows:
        r["particle_steps_per_s"] = a.particles * a.steps / r["loop_s"]
        r["speedup"] = base / r["loop_s"]
        print(f"{r['config']:<36}{r['loop_s']:>10.2f}{r['particle_steps_per_s']:>20.3g}{r['speedup']:>10.2f}")
    same = max(abs(x - y) for r in rows for x, y in zip(r["theta_weights"], rows[0]["theta_weights"]))
    print(f"largest difference in the final weights between configurations: {same:.2e}")
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": machine, "particles": a.particles, "steps": a.steps,
                                       "rows": rows, "max_weight_difference": same}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
