"""Command line: parse arguments into a config and call an experiment. Nothing else lives here.

    implicit-diffusion run langevin-mixture [--config FILE.toml] [--set key=value ...]
                                            [--seed N] [--out DIR] [--no-progress]
    implicit-diffusion list
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import ImplicitDiffusionError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .experiments import EXPERIMENTS

    p = argparse.ArgumentParser(prog="implicit-diffusion", description="Optimization through stochastic sampling.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an experiment")
    r.add_argument("experiment", choices=sorted(EXPERIMENTS), help="experiment name")
    r.add_argument("--config", metavar="FILE.toml", help="TOML file of settings")
    r.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one setting (repeatable), e.g. --set lr=0.05")
    r.add_argument("--seed", type=int, help="random seed (same as --set seed=N)")
    r.add_argument("--out", metavar="DIR", help="output directory (default runs/NAME-TIMESTAMP; must be empty)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub.add_parser("list", help="list experiments and their settings")
    return p


def _run(args: argparse.Namespace) -> int:
    from .config import build_config, load_config_file, parse_overrides
    from .experiments import EXPERIMENTS
    from .experiments.runner import default_run_dir, execute

    experiment = EXPERIMENTS[args.experiment]
    sources = []
    if args.config:
        sources.append(load_config_file(args.config))
    sources.append(parse_overrides(args.overrides))
    if args.seed is not None:
        sources.append({"seed": args.seed})
    if args.no_progress:
        sources.append({"progress": False})
    config = build_config(experiment.Config, *sources)
    run_dir = args.out or default_run_dir(args.experiment)
    start = time.perf_counter()
    result, files = execute(experiment, config, run_dir)
    print(f"{args.experiment} (seed {config.seed})")
    print(experiment.table(result))
    print(f"  wall time, run and outputs (after start-up): {time.perf_counter() - start:.2f} s")
    print(f"wrote {run_dir}/: {', '.join(files)}")
    return 0


def _list() -> int:
    import dataclasses

    from .experiments import EXPERIMENTS

    for name, module in sorted(EXPERIMENTS.items()):
        print(name)
        for f in dataclasses.fields(module.Config):
            print(f"  {f.name} = {f.default!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args) if args.command == "run" else _list()
    except ImplicitDiffusionError as e:
        print(f"implicit-diffusion: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("implicit-diffusion: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
