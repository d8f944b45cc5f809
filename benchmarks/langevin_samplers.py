"""The §5.1 single loop with each Langevin-family sampler: final reward and wall time side by side.

    python benchmarks/langevin_samplers.py [--steps 5000] [--seeds 0 1 2] [--out FILE.json]

Runs ``implicit-diffusion run langevin-mixture --set sampler=NAME`` (in process, the paper's
settings otherwise) for every sampler in ``LANGEVIN_SAMPLERS`` and seed, and prints per sampler:
the exact E_{π*(θ_K)}[R] (closed form from θ_K, no sampling noise), the particles' mean reward
over the last 500 steps, KL(π*(θ_K)‖π*(θ₀)), the acceptance rate (MALA) and the single loop's
wall time, with its ratio to ULA's. Results go to ``benchmarks/results/langevin_samplers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from implicit_diffusion.experiments.langevin_mixture import LangevinMixtureConfig, run
from implicit_diffusion.samplers.registry import LANGEVIN_SAMPLERS

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samplers", nargs="+", default=list(LANGEVIN_SAMPLERS), choices=LANGEVIN_SAMPLERS)
    p.add_argument("--out", default=str(HERE / "results" / "langevin_samplers.json"))
    args = p.parse_args()

    rows = []
    for name in args.samplers:
        runs = [run(LangevinMixtureConfig(sampler=name, num_steps=args.steps, seed=s, progress=False))
                for s in args.seeds]
        summaries = [r.summary() for r in runs]

        def stat(key: str) -> tuple[float, float]:
            v = np.array([s[key] for s in summaries], dtype=float)
            return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

        rows.append({
            "sampler": name,
            "exact_reward_initial": summaries[0]["exact_reward_initial"],
            "exact_reward_final": stat("exact_reward_final"),
            "particle_reward_last_500": stat("reward_final_mean_last"),
            "kl_final": stat("kl_final"),
            "acceptance_rate": None if summaries[0]["acceptance_rate"] is None else stat("acceptance_rate"),
            "wall_time_s": stat("wall_time_s"),
        })
        print(f"done: {name}", flush=True)

    ula = next((r["wall_time_s"][0] for r in rows if r["sampler"] == "ula"), None)
    print(f"\n§5.1 single loop, {args.steps} steps, 1,000 particles, seeds {args.seeds} (mean ± sd)")
    header = f"{'sampler':<16}{'exact E[R] θ₀ → θ_K':>26}{'particles, last 500':>22}{'KL':>14}" \
             f"{'acceptance':>12}{'wall s':>14}{'× ULA':>8}"
    print(header)
    for r in rows:
        e, pr, kl, w = r["exact_reward_final"], r["particle_reward_last_500"], r["kl_final"], r["wall_time_s"]
        acc = "—" if r["acceptance_rate"] is None else f"{r['acceptance_rate'][0]:.3f}"
        ratio = f"{w[0] / ula:.2f}" if ula else "—"
        print(f"{r['sampler']:<16}{r['exact_reward_initial']:>9.4f} → {e[0]:.4f} ± {e[1]:.4f}"
              f"{pr[0]:>13.4f} ± {pr[1]:.4f}{kl[0]:>8.2f} ± {kl[1]:.2f}{acc:>12}{w[0]:>9.2f} ± {w[1]:.2f}{ratio:>8}")

    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine, "steps": args.steps, "seeds": args.seeds,
                                          "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
