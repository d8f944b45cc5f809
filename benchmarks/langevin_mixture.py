"""Time the §5.1 Langevin experiment: contenders side by side in one run, with ratios.

    python benchmarks/langevin_mixture.py [--particles 1000 10000 100000] [--steps 5000]
        [--authors-cmd "CMD"] [--authors-particles-cmd "CMD with {n}"] [--out FILE.json]

Rows:
- loop time (the experiment's single loop, in process), whole-process time of
  ``implicit-diffusion run langevin-mixture`` (subprocess, start to exit), final reward and
  particle-steps per second, at each number of particles;
- the generic autograd path (the same mixture energy as a plain function: ∇ₓV and Γ by
  autograd) against the closed-form path, at 1,000 particles;
- single loop vs nested loop (T = 10, 100) at an equal budget of sampler steps;
- optionally, the authors' JAX script run as a subprocess (``--authors-cmd``; with ``{n}``
  in ``--authors-particles-cmd`` for other particle counts), timed start to exit.

Results are printed and written as JSON (default ``benchmarks/results/langevin_mixture.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from implicit_diffusion.algorithms import NestedLoop, SingleLoop
from implicit_diffusion.experiments.langevin_mixture import LangevinMixtureConfig, run
from implicit_diffusion.models import FunctionPotential, hexagon_centres, hexagon_mixture
from implicit_diffusion.objectives import RewardEstimator, hexagon_reward
from implicit_diffusion.objectives.hexagon_exact import component_reward_expectations

HERE = Path(__file__).resolve().parent
CENTRES = hexagon_centres()
LOG_2PI = float(torch.log(torch.tensor(2 * torch.pi)))


def whole_process(args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "implicit_diffusion", "run", "langevin-mixture", "--no-progress",
                        "--out", str(Path(d) / "run"), *args], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t


def external(cmd: str) -> float:
    t = time.perf_counter()
    subprocess.run(shlex.split(cmd), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def generic_energy(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The hexagon mixture energy written plainly: gradients come from autograd."""
    logw = torch.log_softmax(theta, 0)
    sq = ((x[:, None, :] - CENTRES) ** 2).sum(-1)
    return -torch.logsumexp(logw - sq / 2 - LOG_2PI, 1)


def time_loop(potential, num_particles: int, steps: int, seed: int = 0) -> tuple[float, float]:
    """Seconds for ``steps`` single-loop iterations, and the exact final E[R]."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(potential.parameters(), lr=0.1, foreach=False)
    algo = SingleLoop(potential, RewardEstimator(hexagon_reward), opt, step_size=0.2)
    buf = torch.empty(steps)

    def record(k, x, stats):
        buf[k] = stats["reward"]

    x = torch.randn(num_particles, 2, generator=g)
    t = time.perf_counter()
    algo.run(x, steps, generator=g, callbacks=[record])
    elapsed = time.perf_counter() - t
    return elapsed, buf[-min(500, steps):].mean().item()


def exact_reward(logits: torch.Tensor) -> float:
    e = component_reward_expectations(hexagon_mixture().means.double().numpy(), 1.0, "indicator")
    return float(torch.softmax(logits.detach().double(), 0).numpy() @ e)


def nested(num_particles: int, budget: int, inner: int, seed: int = 0) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    V = hexagon_mixture()
    algo = NestedLoop(V, RewardEstimator(hexagon_reward), torch.optim.SGD(V.parameters(), lr=0.1, foreach=False),
                      init_fn=lambda gen: torch.randn(num_particles, 2, generator=gen), num_inner_steps=inner,
                      step_size=0.2)
    t = time.perf_counter()
    algo.run(None, budget // inner, generator=g)
    return time.perf_counter() - t, exact_reward(V.logits)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--particles", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--authors-cmd", help="command running the authors' script at its defaults (timed start to exit)")
    p.add_argument("--authors-particles-cmd", help="same with '{n}' where the number of particles goes")
    p.add_argument("--out", default=str(HERE / "results" / "langevin_mixture.json"))
    args = p.parse_args()

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads, Python {platform.python_version()}"
    print(f"# §5.1 Langevin benchmark, {args.steps} steps — {machine}")
    results: dict = {"machine": machine, "steps": args.steps, "rows": []}

    print("\n## Implicit Diffusion (single loop), closed-form gradients")
    print(f"{'particles':>10} {'loop s':>8} {'process s':>10} {'reward(last500)':>16} {'particle-steps/s':>17}")
    for n in args.particles:
        r = run(LangevinMixtureConfig(num_particles=n, num_steps=args.steps, progress=False))
        proc = whole_process(["--set", f"num_particles={n}", "--set", f"num_steps={args.steps}"])
        tail = r.rewards[-min(500, args.steps):].mean()
        rate = n * args.steps / r.wall_time
        print(f"{n:>10} {r.wall_time:>8.2f} {proc:>10.2f} {tail:>16.4f} {rate:>17.3g}")
        results["rows"].append({"contender": "ours", "particles": n, "loop_s": r.wall_time, "process_s": proc,
                                "reward_last500": float(tail), "particle_steps_per_s": rate})

    n0 = args.particles[0]
    print(f"\n## Generic autograd path vs closed form ({n0} particles)")
    fast, _ = time_loop(hexagon_mixture(), n0, args.steps)
    generic_pot = FunctionPotential(generic_energy, torch.tensor([1.5, 0, 1.5, 0, 1.5, 0]))
    slow, slow_reward = time_loop(generic_pot, n0, args.steps)
    print(f"closed form {fast:.2f} s, autograd {slow:.2f} s (×{slow / fast:.1f}); "
          f"autograd run's reward {slow_reward:.4f}")
    results["generic"] = {"closed_form_s": fast, "autograd_s": slow, "autograd_reward_last500": slow_reward}

    print(f"\n## Single loop vs nested loop, {args.steps} sampler steps each ({n0} particles)")
    print(f"{'algorithm':>22} {'time s':>8} {'θ updates':>10} {'exact E[R] at end':>18}")
    V = hexagon_mixture()
    g = torch.Generator().manual_seed(0)
    algo = SingleLoop(V, RewardEstimator(hexagon_reward), torch.optim.SGD(V.parameters(), lr=0.1, foreach=False),
                      step_size=0.2)
    t = time.perf_counter()
    algo.run(torch.randn(n0, 2, generator=g), args.steps, generator=g)
    single = (time.perf_counter() - t, exact_reward(V.logits))
    print(f"{'single loop':>22} {single[0]:>8.2f} {args.steps:>10} {single[1]:>18.4f}")
    results["budget"] = [{"algorithm": "single", "s": single[0], "exact_reward": single[1]}]
    for inner in (10, 100):
        s, rew = nested(n0, args.steps, inner)
        print(f"{f'nested T={inner}':>22} {s:>8.2f} {args.steps // inner:>10} {rew:>18.4f}")
        results["budget"].append({"algorithm": f"nested T={inner}", "s": s, "exact_reward": rew})

    if args.authors_cmd:
        print("\n## Authors' JAX script (subprocess, start to exit) vs ours")
        ours = {r["particles"]: r for r in results["rows"]}
        theirs = {n0: external(args.authors_cmd)}
        if args.authors_particles_cmd:
            for n in args.particles[1:]:
                theirs[n] = external(args.authors_particles_cmd.format(n=n))
        print(f"{'particles':>10} {'theirs s':>9} {'ours s':>8} {'ratio':>7} {'their p-steps/s':>16} "
              f"{'ours p-steps/s':>15}")
        results["authors"] = []
        for n, s in theirs.items():
            o = ours[n]["process_s"]
            print(f"{n:>10} {s:>9.2f} {o:>8.2f} {s / o:>6.1f}× {n * args.steps / s:>16.3g} {n * args.steps / o:>15.3g}")
            results["authors"].append({"particles": n, "theirs_process_s": s, "ours_process_s": o})

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
