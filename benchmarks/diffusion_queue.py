"""Queue vs nested loop for reward finetuning of a diffusion model, side by side in one run.

    python benchmarks/diffusion_queue.py [--Ms 20 50 100] [--batch 16] [--budget 30]
        [--algorithms ...] [--max-batch 64] [--fill wait|partial] [--tail drop|apply]
        [--device cpu|cuda] [--out FILE.json]

The task is ``diffusion-finetune``'s (the shipped digits U-Net, brightness reward λ = 30,
Girsanov path KL β = 1, Euler–Maruyama; Adam lr 3e-4, 3× the experiment's default, to move
fast) with M sampling steps and ``--batch`` images per θ update (per queue slot). Contenders:

- ``nested-autograd``: sample M steps with the graph kept, backpropagate (full backprop, DRaFT-style);
- ``nested-adjoint``: sample without a graph, adjoint sweep of M steps;
- ``queue-sequential``: the queue of M batches, one batched forward call per iteration, the
  exiting batch's adjoint swept at once;
- ``queue-pipelined``: the same, every in-flight adjoint advanced one step per iteration in one
  batched call;
- ``queue-pipelined-chunked``: the same with ``max_batch`` (``--max-batch``, default 64): the
  batched forward and adjoint calls split into chunks of at most that many images.

In every adjoint contender the path-KL running cost reuses the sampler step's network forward.
The queue contenders take ``--fill`` (default ``wait``: the pipelined queue applies no θ update
until M adjoints are in flight, i.e. until iteration 2(M − 1); ``partial``: from the first exit,
with partial gradients) and ``--tail`` (recorded only: the budget ends mid-run, so no contender
drains; the JSON says which were used). Both are no-ops for the sequential queue.

Each (contender, M) runs in its own process, so memory figures do not mix. Reported:

- time per θ update (median over the iterations that updated θ, after a warm-up of 3; the
  queue's fill phase excluded), the number of θ updates and, for the queue, of exited batches,
  and the training time at which θ was first updated (the queue's fill, longer with ``wait``);
- peak memory of the training loop above the set-up state: on CPU the process's peak resident
  set (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs`` before the loop),
  on CUDA ``torch.cuda.max_memory_allocated``;
- the reward reached within ``--budget`` seconds of training (evaluation time not counted): mean
  brightness of 128 samples on fixed noise (the same for every contender) at the final θ, and the
  curve of it against wall time,
  at 1/32, 1/16, 1/8, 1/4, 1/2, 3/4 and all of the budget, from which the time the queue needs
  to reach the nested loop's final reward is read (linear interpolation).

Results are printed and written as JSON (default ``benchmarks/results/diffusion_queue.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ALGORITHMS = ("nested-autograd", "nested-adjoint", "queue-sequential", "queue-pipelined", "queue-pipelined-chunked")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Memory:
    """Peak memory of a block above its start, in MiB (CUDA allocator, or CPU resident set)."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _rss_kib("VmRSS") * 1024

    def peak_mib(self) -> float:
        if self.device == "cuda":
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return (_rss_kib("VmHWM") * 1024 - self.base) / 2**20


def worker(name: str, M: int, batch: int, budget: float, device: str, seed: int, max_batch: int,
           fill: str = "wait", tail: str = "drop") -> dict:
    from implicit_diffusion.algorithms import DIFFUSION_ALGORITHMS as ALGOS
    from implicit_diffusion.objectives import brightness
    from implicit_diffusion.objectives.girsanov import path_kl_cost
    from implicit_diffusion.pretrained import load_pretrained
    from implicit_diffusion.samplers import euler_maruyama_step, sample

    loaded = load_pretrained("digits", device=device)
    model, shape = loaded.model, tuple(loaded.extra["data_shape"])
    schedule = dataclasses.replace(loaded.schedule, num_steps=M)
    cls, options = ALGOS[name.removesuffix("-chunked")]
    if name.endswith("-chunked"):
        options = {**options, "max_batch": max_batch}
    if name.startswith("queue"):
        options = {**options, "fill": fill, "tail": tail}
    algo = cls(model, euler_maruyama_step, schedule, torch.optim.Adam(model.parameters(), lr=3e-4),
               init_fn=lambda g: torch.randn((batch, *shape), generator=g, device=device),
               reward_fn=brightness, reward_weight=30.0, running_cost=path_kl_cost(model, schedule, 1.0),
               prediction=model.prediction, max_grad_norm=1.0, **options)
    eval_gen = torch.Generator(device=device)
    applied = [0]  # θ updates: the optimizer's steps (an exit with fill="wait" may update nothing)
    algo.optimizer.register_step_post_hook(lambda *_: applied.__setitem__(0, applied[0] + 1))

    def evaluate() -> float:
        eval_gen.manual_seed(seed + 7)
        with torch.no_grad():
            x = sample(euler_maruyama_step, model, torch.randn((128, *shape), generator=eval_gen, device=device),
                       schedule=schedule, generator=eval_gen, prediction=model.prediction)
        return float(brightness(x).mean())

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    generator = torch.Generator(device=device).manual_seed(seed)
    memory = Memory(device)
    curve = [(0.0, evaluate())]
    update_times: list[float] = []
    exits, first_update = 0, None
    # evaluation times: dense early (where the contenders part), then every quarter of the budget
    marks = [budget * f for f in (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4)]
    trained, k = 0.0, 0
    memory.start()
    while trained < budget:
        sync()
        t0 = time.perf_counter()
        before = applied[0]
        stats = algo.step(k, generator=generator)
        sync()
        dt = time.perf_counter() - t0
        trained += dt
        exits += "reward" in stats
        if applied[0] > before:
            update_times.append(dt)
            first_update = trained if first_update is None else first_update
        k += 1
        if (marks and trained >= marks[0]) or trained >= budget:
            curve.append((trained, evaluate()))  # not counted in `trained`
            marks = [m for m in marks if m > trained]
    peak = memory.peak_mib()
    warm = update_times[min(3, len(update_times) - 1):] if update_times else [float("nan")]
    queue = {"fill": fill, "tail": tail, "exits": exits} if name.startswith("queue") else {}
    return {"algorithm": name, "M": M, "batch": batch, "iterations": k, "updates": len(update_times),
            "first_update_s": first_update, **queue,
            "time_per_update_s": statistics.median(warm), "peak_mib": peak, "curve": curve,
            "final_reward": curve[-1][1], "initial_reward": curve[0][1]}


def time_to_reach(curve: list[list[float]], level: float) -> float | None:
    """First wall time at which the curve reaches ``level`` (linear interpolation), or None."""
    for (t0, r0), (t1, r1) in zip(curve, curve[1:]):
        if r1 >= level:
            return t0 if r0 >= level else t0 + (t1 - t0) * (level - r0) / (r1 - r0)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--Ms", type=int, nargs="+", default=[20, 50, 100])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--budget", type=float, default=30.0, help="training seconds per contender and M")
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=64, help="images per network call of queue-pipelined-chunked")
    p.add_argument("--fill", default="wait", choices=["wait", "partial"], help="the queue's fill (pipelined)")
    p.add_argument("--tail", default="drop", choices=["drop", "apply"],
                   help="the queue's tail (recorded; the budget ends mid-run, nothing is drained)")
    p.add_argument("--out", default=str(HERE / "results" / "diffusion_queue.json"))
    p.add_argument("--worker", nargs=2, metavar=("ALGORITHM", "M"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        res = worker(args.worker[0], int(args.worker[1]), args.batch, args.budget, args.device, args.seed,
                     args.max_batch, args.fill, args.tail)
        print(json.dumps(res))
        return

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    print(f"machine: {machine}; batch {args.batch} per update/slot; budget {args.budget:g} s training per run; "
          f"chunks of {args.max_batch} images for queue-pipelined-chunked; queue fill {args.fill!r}, "
          f"tail {args.tail!r}")
    rows = []
    for M in args.Ms:
        for name in args.algorithms:
            cmd = [sys.executable, __file__, "--worker", name, str(M), "--batch", str(args.batch),
                   "--budget", str(args.budget), "--device", args.device, "--seed", str(args.seed),
                   "--max-batch", str(args.max_batch), "--fill", args.fill, "--tail", args.tail]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"  M={M:>3} {name:<23} {row['time_per_update_s'] * 1e3:8.1f} ms/update  "
                  f"peak {row['peak_mib']:7.1f} MiB  updates {row['updates']:>5}  "
                  f"first at {'never' if row['first_update_s'] is None else format(row['first_update_s'], '5.1f')} s  "
                  f"reward {row['initial_reward']:+.4f} → {row['final_reward']:+.4f}", flush=True)
    print("\nratios (per M): nested-autograd / contender time per update; queue time to reach the "
          "nested loops' final reward as a fraction of the budget")
    for M in args.Ms:
        by = {r["algorithm"]: r for r in rows if r["M"] == M}
        ref = by.get("nested-autograd")
        for name, r in by.items():
            speed = f"{ref['time_per_update_s'] / r['time_per_update_s']:5.2f}×" if ref else "  n/a"
            mem = f"{r['peak_mib'] / ref['peak_mib']:5.2f}" if ref and ref["peak_mib"] > 0 else "  n/a"
            reach = []
            for nested in ("nested-autograd", "nested-adjoint"):
                if name.startswith("queue") and nested in by:
                    t = time_to_reach(r["curve"], by[nested]["final_reward"])
                    reach.append(f"reaches {nested}'s {by[nested]['final_reward']:+.4f} at "
                                 + ("never" if t is None else f"{t / args.budget:.2f} of the budget"))
            print(f"  M={M:>3} {name:<23} speed {speed}  memory/nested-autograd {mem}  {'; '.join(reach)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
