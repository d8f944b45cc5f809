"""Reward finetuning methods side by side: the same model, reward, λ/β, wall-clock budget and seeds.

    python benchmarks/finetune_methods.py [--rewards brightness class:3] [--ratios 10 30 100]
        [--budget 15] [--M 20] [--batch 8] [--draft-k 5] [--methods ...] [--device cpu|cuda]
        [--out FILE.json] [--figure FILE.png]
    python benchmarks/finetune_methods.py --report FILE.json [FILE2.json ...]   # saved runs' tables and figure
        again; runs that differ only in --seed are combined: means over seeds ± SE across seeds

The task is ``diffusion-finetune``'s: the shipped digits U-Net (ε-prediction, 8×8), DDPM ancestral
steps, M = ``--M`` on the experiment's grid (ρ = 2), Adam (lr ``--lr``), gradient clipping at norm 1,
β = 1 and λ = (λ/β)·β, the exact path KL of the sampler (``path_kl_cost``) as the KL to θ₀.
Contenders (``--methods``):

- ``nested-autograd``: sample M steps with the graph kept, backpropagate through all of them;
- ``draft-1`` and ``draft-K`` (K = ``--draft-k``): DRaFT-K, the reward backpropagated through the
  last K steps only (Clark et al. 2024), the path KL still on every step;
- ``adjoint-matching``: Adjoint Matching (Domingo-Enrich et al. 2025), a regression of the control
  onto the lean adjoint (it has no running cost: the KL is in its target law);
- ``queue-sequential`` and ``queue-pipelined``: Implicit Diffusion's queue (Marion et al. 2024, §4),
  M partially sampled batches advanced together; pipelined: no θ update before iteration 2(M − 1).

Each (reward, λ/β, method) trains for ``--budget`` seconds of wall time (evaluations not counted) in
its own process, from the same seed, then is evaluated on 256 samples drawn from the same noise for
every contender: the mean reward ± SE, the path KL ± SE, for ``class:C`` the fraction classified as C.
Also reported: θ updates, network evaluations during training (images through the U-Net, θ and θ₀
alike; backward passes not counted), and peak memory of the training loop (CPU: the process's
peak resident set above the start; CUDA: ``max_memory_allocated``). The printout ends with the
reward-vs-KL front per reward; the figure draws it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusion_queue import Memory

HERE = Path(__file__).resolve().parent
METHODS = ("nested-autograd", "draft-1", "draft-K", "adjoint-matching", "queue-sequential", "queue-pipelined")


def build(method: str, model, step, schedule, optimizer, *, init_fn, reward_fn, lam: float, beta: float,
          running_cost, draft_k: int):
    from implicit_diffusion.algorithms import DiffusionAdjointMatching, DiffusionNestedLoop, DiffusionQueue

    common = dict(init_fn=init_fn, reward_fn=reward_fn, reward_weight=lam, prediction=model.prediction,
                  max_grad_norm=1.0)
    if method == "adjoint-matching":
        return DiffusionAdjointMatching(model, step, schedule, optimizer, kl_weight=beta, **common)
    if method.startswith("queue"):
        return DiffusionQueue(model, step, schedule, optimizer, running_cost=running_cost,
                              adjoint=method.removeprefix("queue-"), **common)
    last_k = {"nested-autograd": None, "draft-1": 1, "draft-K": draft_k}[method]
    return DiffusionNestedLoop(model, step, schedule, optimizer, running_cost=running_cost, gradient="autograd",
                               last_k=last_k, **common)


def worker(method: str, reward: str, ratio: float, args) -> dict:
    from implicit_diffusion.objectives.class_reward import fraction_classified_as, is_class_reward, parse_class_reward
    from implicit_diffusion.objectives.evaluation import evaluate
    from implicit_diffusion.objectives.girsanov import path_kl_cost
    from implicit_diffusion.objectives.image_rewards import IMAGE_REWARDS
    from implicit_diffusion.pretrained import load_pretrained
    from implicit_diffusion.samplers.diffusion import ddpm_step

    torch.set_num_threads(args.threads)
    device = args.device
    loaded = load_pretrained("digits", device=device)
    model, shape = loaded.model.train(False), tuple(loaded.extra["data_shape"])
    schedule = dataclasses.replace(loaded.schedule, num_steps=args.M, time_power=2.0)
    reward_fn = parse_class_reward(reward, shape, device=device) if is_class_reward(reward) else IMAGE_REWARDS[reward]
    beta, lam = 1.0, ratio
    kl_eval = path_kl_cost(model, schedule, 1.0, ddpm_step)  # θ₀ = the pretrained weights
    running_cost = path_kl_cost(model, schedule, beta, ddpm_step)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    algo = build(method, model, ddpm_step, schedule, optimizer,
                 init_fn=lambda g: torch.randn((args.batch, *shape), generator=g, device=device),
                 reward_fn=reward_fn, lam=lam, beta=beta, running_cost=running_cost, draft_k=args.draft_k)
    updates = [0]
    optimizer.register_step_post_hook(lambda *_: updates.__setitem__(0, updates[0] + 1))
    images = [0]
    hook = model.register_forward_hook(lambda _m, inputs, _out: images.__setitem__(0, images[0] + inputs[0].shape[0]))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    generator = torch.Generator(device=device).manual_seed(args.seed)
    memory = Memory(device)
    memory.start()
    trained, k = 0.0, 0
    while trained < args.budget:
        sync()
        t0 = time.perf_counter()
        algo.step(k, generator=generator)
        sync()
        trained += time.perf_counter() - t0
        k += 1
    peak = memory.peak_mib()
    hook.remove()
    ev, x = evaluate(model, ddpm_step, schedule, shape, 256, reward_fn=reward_fn, kl=kl_eval,
                     generator=torch.Generator(device=device).manual_seed(args.seed + 1), prediction=model.prediction)
    out = {"method": method, "reward_name": reward, "ratio": ratio, "iterations": k, "updates": updates[0],
           "train_s": trained, "images": images[0], "peak_mib": peak, **ev._asdict()}
    if is_class_reward(reward):
        out["fraction_classified"] = fraction_classified_as(reward_fn, x, reward_fn.target)
    return out


def pretrained_row(reward: str, args) -> dict:
    """The pretrained model, evaluated on the same noise as every contender (its path KL is 0)."""
    from implicit_diffusion.objectives.class_reward import fraction_classified_as, is_class_reward, parse_class_reward
    from implicit_diffusion.objectives.evaluation import evaluate
    from implicit_diffusion.objectives.girsanov import path_kl_cost
    from implicit_diffusion.objectives.image_rewards import IMAGE_REWARDS
    from implicit_diffusion.pretrained import load_pretrained
    from implicit_diffusion.samplers.diffusion import ddpm_step

    loaded = load_pretrained("digits", device=args.device)
    model, shape = loaded.model.train(False), tuple(loaded.extra["data_shape"])
    schedule = dataclasses.replace(loaded.schedule, num_steps=args.M, time_power=2.0)
    reward_fn = (parse_class_reward(reward, shape, device=args.device) if is_class_reward(reward)
                 else IMAGE_REWARDS[reward])
    ev, x = evaluate(model, ddpm_step, schedule, shape, 256, reward_fn=reward_fn,
                     kl=path_kl_cost(model, schedule, 1.0, ddpm_step),
                     generator=torch.Generator(device=args.device).manual_seed(args.seed + 1),
                     prediction=model.prediction)
    row = {"method": "pretrained", "reward_name": reward, **ev._asdict()}
    if is_class_reward(reward):
        row["fraction_classified"] = fraction_classified_as(reward_fn, x, reward_fn.target)
    return row


def plot(path: Path, rows: list[dict], bases: dict[str, dict], rewards: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rewards), figsize=(5.5 * len(rewards), 4.2), squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        for method in METHODS:
            pts = sorted((r["kl"], r["kl_se"], r["reward"], r["reward_se"], r["ratio"]) for r in rows
                         if r["method"] == method and r["reward_name"] == reward)
            if not pts:
                continue
            kl, kl_se, rw, rw_se, ratio = map(list, zip(*pts))
            line = ax.errorbar(kl, rw, xerr=kl_se, yerr=rw_se, marker="o", capsize=2, label=method)
            for x, y, q in zip(kl, rw, ratio):
                ax.annotate(f"{q:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7,
                            color=line[0].get_color())
        ax.axhline(bases[reward]["reward"], color="grey", ls=":", label="pretrained")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("path KL to the pretrained model (nats; symlog)")
        ax.set_ylabel(f"mean {reward} of 256 samples (± SE)")
        ax.set_title(f"{reward}: reward vs KL, labels λ/β")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine_line(machine: str, a: dict) -> str:
    return (f"machine: {machine}; {a['threads']} thread(s) per contender; M = {a['M']} DDPM steps (ρ = 2), batch "
            f"{a['batch']}, Adam lr {a['lr']:g}, β = 1; budget {a['budget']:g} s of training per contender; "
            f"draft-K: K = {a['draft_k']}; " + seeds_phrase(a["seed"]))


def seeds_phrase(seed: int | list[int]) -> str:
    """"seed 0", or for combined runs "seeds 0, 1, 2 (means over seeds, ± SE across seeds)"."""
    if isinstance(seed, int):
        return f"seed {seed}"
    return f"seeds {', '.join(map(str, seed))} (means over seeds, ± SE across seeds; cost columns: means)"


def print_header(reward: str, base: dict) -> None:
    frac = (f", {base['fraction_classified']:.1%}{fraction_se(base)} classified as {reward[6:]}"
            if "fraction_classified" in base else "")
    print(f"\n{reward}: pretrained {base['reward']:+.4f} ± {base['reward_se']:.4f}{frac}")
    print(f"  {'λ/β':>5} {'method':<17} {'reward ± SE':>18} {'path KL ± SE':>16} {'train s':>7} {'updates':>7} "
          f"{'net evals':>10} {'peak MiB':>8}" + ("  classified" if frac else ""))


def fraction_se(r: dict) -> str:
    """" ± 1.2%" where the fraction classified has a standard error across seeds, else ""."""
    return f" ± {r['fraction_classified_se']:.1%}" if "fraction_classified_se" in r else ""


def print_row(r: dict) -> None:
    cls = f"  {r['fraction_classified']:10.1%}{fraction_se(r)}" if "fraction_classified" in r else ""
    print(f"  {r['ratio']:5g} {r['method']:<17} {r['reward']:+9.4f} ± {r['reward_se']:.4f} "
          f"{r['kl']:8.3f} ± {r['kl_se']:.3f} {r['train_s']:7.1f} {r['updates']:7d} {r['images']:10,d} "
          f"{r['peak_mib']:8.1f}{cls}", flush=True)


def print_fronts(rows: list[dict], bases: dict[str, dict], rewards: list[str], methods: list[str]) -> None:
    if rows and "rise_se" in rows[0]:
        print("\nrise over the pretrained reward in standard errors (per seed the contender minus the pretrained "
              "model on the same noise; SE across seeds of that difference: with few seeds a rough scale, and "
              "large where every seed rises alike), and mean reward gained per nat of mean path KL")
    else:
        print("\nrise over the pretrained reward in standard errors (all evaluated on the same noise, so positively "
              "correlated: this SE of the difference is conservative), and reward gained per nat of path KL")
    for reward in rewards:
        base = bases[reward]
        for method in methods:
            parts = []
            for r in (r for r in rows if r["method"] == method and r["reward_name"] == reward):
                gain = r.get("rise", r["reward"] - base["reward"])
                se = r["rise_se"] if "rise_se" in r else math.hypot(r["reward_se"], base["reward_se"])
                rise = gain / se if se > 0 else math.copysign(math.inf, gain)
                per_kl = gain / r["kl"] if r["kl"] > 0 else float("nan")
                parts.append(f"λ/β={r['ratio']:g}: {rise:+6.1f} SE, {per_kl:+.4f}/nat")
            print(f"  {reward:<10} {method:<17} " + "; ".join(parts))


def combine(saved: list[dict]) -> dict:
    """Saved runs (``--out`` JSON) that differ only in their seed, as one run: per (reward, λ/β, method)
    the mean over the seeds of the reward, path KL and fraction classified, ± their standard error
    across seeds (sample standard deviation / √n: training seed and evaluation noise both vary), and
    the mean of the cost columns. One run is returned as it is."""
    if len(saved) == 1:
        return saved[0]
    first = saved[0]

    def settings(run: dict) -> dict:
        return {k: v for k, v in run["args"].items() if k not in ("seed", "out", "figure", "report")}

    def mean_se(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))

    fixed = settings(first)
    for run in saved[1:]:
        other = settings(run)
        if other != fixed or run["machine"] != first["machine"]:
            diff = sorted(k for k in set(fixed) | set(other) if fixed.get(k) != other.get(k))
            raise SystemExit(f"--report: the runs differ in more than their seed (in {diff or 'the machine'}); "
                             "combine only runs of the same settings on the same machine")
    seeds = [run["args"]["seed"] for run in saved]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--report: a seed appears twice among the runs: {seeds}")

    def merge(group: list[dict]) -> dict:
        out = dict(group[0])
        n = len(group)
        for key, se in (("reward", "reward_se"), ("kl", "kl_se"), ("fraction_classified", "fraction_classified_se")):
            if key in out:
                out[key], out[se] = mean_se([r[key] for r in group])
        for key in ("train_s", "peak_mib"):
            if key in out:
                out[key] = sum(r[key] for r in group) / n
        for key in ("iterations", "updates", "images"):
            if key in out:
                out[key] = round(sum(r[key] for r in group) / n)
        return out

    def key(r: dict) -> tuple:
        return r["reward_name"], r["ratio"], r["method"]

    keys = [key(r) for r in first["rows"]]
    groups = {k: [] for k in keys}
    for run in saved:
        if sorted(map(key, run["rows"])) != sorted(keys):
            raise SystemExit(f"--report: the run of seed {run['args']['seed']} has other contenders than seed "
                             f"{seeds[0]}'s")
        for r in run["rows"]:
            groups[key(r)].append(r)
    bases = {reward: merge([run["pretrained"][reward] for run in saved]) for reward in first["pretrained"]}
    rows = []
    for k in keys:  # the rise, paired: each seed's contender minus that seed's pretrained model (the same noise)
        rise, rise_se = mean_se([r["reward"] - run["pretrained"][k[0]]["reward"] for r, run in zip(groups[k], saved)])
        rows.append({**merge(groups[k]), "rise": rise, "rise_se": rise_se})
    return {"machine": first["machine"], "args": {**first["args"], "seed": seeds}, "pretrained": bases, "rows": rows}


def report(paths: list[Path], figure: Path | None) -> None:
    """Print the tables of saved runs (``--out`` JSON) again and redraw the figure, without rerunning;
    several runs that differ only in their seed are combined (:func:`combine`)."""
    saved = combine([json.loads(Path(path).read_text()) for path in paths])
    a, rows, bases = saved["args"], saved["rows"], saved["pretrained"]
    print(machine_line(saved["machine"], a))
    for reward in a["rewards"]:
        print_header(reward, bases[reward])
        for r in (r for r in rows if r["reward_name"] == reward):
            print_row(r)
    print_fronts(rows, bases, a["rewards"], a["methods"])
    if figure is not None:
        plot(figure, rows, bases, a["rewards"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rewards", nargs="+", default=["brightness", "class:3"])
    p.add_argument("--ratios", type=float, nargs="+", default=[10.0, 30.0, 100.0], help="λ/β values (β = 1)")
    p.add_argument("--budget", type=float, default=15.0, help="training seconds per contender")
    p.add_argument("--M", type=int, default=20, help="sampler steps")
    p.add_argument("--batch", type=int, default=8, help="samples per update (per queue slot)")
    p.add_argument("--draft-k", type=int, default=5, help="K of draft-K")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per contender")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "finetune_methods.json"))
    p.add_argument("--figure", default=str(HERE / "results" / "finetune_methods.png"))
    p.add_argument("--report", metavar="JSON", nargs="+",
                   help="print a saved run's tables again and redraw its figure; several runs that differ only in "
                        "their seed are combined: means over seeds ± SE across seeds")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "REWARD", "RATIO"), help=argparse.SUPPRESS)
    p.add_argument("--pretrained", metavar="REWARD", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.report:
        report([Path(path) for path in args.report], Path(args.figure))
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], float(args.worker[2]), args)))
        return
    if args.pretrained:
        print(json.dumps(pretrained_row(args.pretrained, args)))
        return

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    print(machine_line(machine, vars(args)))
    passed = ["--budget", str(args.budget), "--M", str(args.M), "--batch", str(args.batch), "--draft-k",
              str(args.draft_k), "--lr", str(args.lr), "--device", args.device, "--threads", str(args.threads),
              "--seed", str(args.seed)]

    def call(extra: list[str]) -> dict:
        out = subprocess.run([sys.executable, __file__, *extra, *passed], check=True, capture_output=True,
                             text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    rows, bases = [], {}
    for reward in args.rewards:
        bases[reward] = call(["--pretrained", reward])
        print_header(reward, bases[reward])
        for ratio in args.ratios:
            for method in args.methods:
                rows.append(call(["--worker", method, reward, str(ratio)]))
                print_row(rows[-1])
    print_fronts(rows, bases, args.rewards, args.methods)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "args": vars(args), "pretrained": bases, "rows": rows},
                                         indent=1) + "\n")
    plot(Path(args.figure), rows, bases, args.rewards)
    print(f"wrote {args.out}, {args.figure}")


if __name__ == "__main__":
    main()
