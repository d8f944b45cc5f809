"""Command line: parse arguments into a config and call an experiment. Nothing else lives here.

    implicit-diffusion run NAME [--preset NAME] [--config FILE.toml|.yaml] [--set key=value ...] [--seed N]
                                [--out DIR] [--no-progress] [--data PATH] [--trust-pickle]
                                [--reward NAME] [--sweep]
                                [--checkpoint-every N] [--diffusers-model DIR] [--tensorboard]
                                [--device auto|cpu|cuda|cuda:N|mps] [--dtype float32|float64|bfloat16]
    implicit-diffusion pretrain DATASET [--data PATH] [--trust-pickle] [same options]
    implicit-diffusion resume RUN_DIR [--device NAME]
    implicit-diffusion report RUN_DIR [RUN_DIR ...] [--out DIR]
    implicit-diffusion list [NAME] [--markdown]
    implicit-diffusion --version
    torchrun --nproc_per_node W -m implicit_diffusion run NAME --out DIR [...]   (particles sharded)

``--data``, ``--trust-pickle``, ``--reward``, ``--sweep``, ``--checkpoint-every``, ``--device`` and
``--dtype`` are shorthands for the config keys ``data``, ``trust_pickle``, ``reward``, ``sweep``,
``checkpoint_every``, ``device`` and ``dtype``; an experiment without such a key says so. ``resume``
continues a run from its checkpoint, on another device with ``--device``. ``--preset NAME`` starts
from a named set of settings of the experiment (its ``PRESETS``; ``list`` shows them), which
``--config`` and ``--set`` then override. ``list`` names the experiments; ``list NAME`` and ``run NAME
--help`` (``pretrain DATASET --help``) describe every setting of one: default, meaning, unit and allowed
values, from the config dataclass's fields (:mod:`~implicit_diffusion.runtime.settings`); ``list --markdown``
writes docs/settings.md.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import ImplicitDiffusionError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .experiments import EXPERIMENTS
    from .experiments.pretrain import DATASETS

    p = argparse.ArgumentParser(prog="implicit-diffusion", description="Optimization through stochastic sampling.")
    p.add_argument("--version", action="version", version=f"implicit-diffusion {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run an experiment", add_help=False)
    r.add_argument("-h", "--help", action=_HelpWithSettings, nargs=0,
                   help="show this help (after NAME: with every setting of the experiment) and exit")
    r.add_argument("experiment", choices=sorted(EXPERIMENTS), help="experiment name")
    r.add_argument("--preset", metavar="NAME",
                   help="start from the experiment's named settings (see `list`), e.g. diffusion-finetune "
                        "--preset mnist5k; --config and --set override them")
    _common_options(r)
    r.add_argument("--reward", help="reward name (same as --set reward=NAME)")
    r.add_argument("--sweep", action="store_true", help="sweep the experiment's trade-off (same as --set sweep=true)")
    r.add_argument("--diffusers-model", metavar="DIR",
                   help="a local diffusers UNet2DModel + scheduler directory (same as --set diffusers_model=DIR)")
    c = sub.add_parser("resume", help="continue an interrupted run from its checkpoint")
    c.add_argument("run_dir", metavar="RUN_DIR", help="the run's output directory")
    c.add_argument("--device", metavar="NAME",
                   help="continue on this device instead of the run's own (auto, cpu, cuda, cuda:N, mps); "
                        "on another device type the random streams are re-seeded")
    rep = sub.add_parser("report", help="plot every metric of one or several runs, with a Markdown summary")
    rep.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run output directories (several: compared)")
    rep.add_argument("--out", metavar="DIR", help="where to write (default RUN_DIR/report for one run)")
    t = sub.add_parser("pretrain", help="train a score model by denoising score matching", add_help=False)
    t.add_argument("-h", "--help", action=_HelpWithSettings, nargs=0,
                   help="show this help with every setting of pretrain and exit")
    t.add_argument("dataset", choices=DATASETS, help="built-in data set, or mnist/cifar10/images with --data")
    _common_options(t)
    lst = sub.add_parser("list", help="list the experiments, or every setting of one")
    lst.add_argument("name", nargs="?", choices=[*sorted(EXPERIMENTS), "pretrain"], metavar="NAME",
                     help="an experiment (or pretrain): show each setting's default, meaning, unit and allowed values")
    lst.add_argument("--markdown", action="store_true",
                     help="print the settings of every experiment as Markdown tables (docs/settings.md)")
    return p


class _HelpWithSettings(argparse.Action):
    """``-h``/``--help`` of ``run`` and ``pretrain``: the options, then, once the experiment is named
    (``run NAME --help``), each of its settings with its default and meaning."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        name = "pretrain" if parser.prog.endswith(" pretrain") else getattr(namespace, "experiment", None)
        if name is not None:
            print()
            print(_settings_text(name))
        else:
            print("\nname the experiment before --help (run NAME --help) to see its settings")
        parser.exit()


def _job(name: str):
    from .experiments import EXPERIMENTS, pretrain

    return pretrain if name == "pretrain" else EXPERIMENTS[name]


def _settings_text(name: str) -> str:
    """Every setting of the job ``name`` (an experiment or pretrain), and its presets."""
    from .runtime.settings import render_text

    module = _job(name)
    command = "pretrain DATASET" if name == "pretrain" else f"run {name}"
    lines = [f"settings of {name} (--set KEY=VALUE, values in TOML syntax, None as KEY=None; "
             f"`implicit-diffusion {command}`):",
             render_text(module.Config)]
    presets = getattr(module, "PRESETS", {})
    if presets:
        lines.append("presets (--preset NAME; --config and --set override them):")
        for preset, values in presets.items():
            lines.append(f"  --preset {preset}: " + ", ".join(f"{k} = {v!r}" for k, v in values.items()))
    return "\n".join(lines)


def _common_options(r: argparse.ArgumentParser) -> None:
    r.add_argument("--config", metavar="FILE", help="settings file: .toml, .yaml or .yml")
    r.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one setting (repeatable), e.g. --set lr=0.05")
    r.add_argument("--seed", type=int, help="random seed (same as --set seed=N)")
    r.add_argument("--out", metavar="DIR", help="output directory (default runs/NAME-TIMESTAMP; must be empty)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--tensorboard", action="store_true",
                   help="also write the metrics as TensorBoard scalars to OUT/tensorboard (optional dependency)")
    r.add_argument("--data", metavar="PATH|NAME",
                   help="images on disk (MNIST IDX/.npz, CIFAR-10 .npz or batches, a folder); for ebm a built-in "
                        "data set: moons, swiss-roll, rings, digits")
    r.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="write a checkpoint every N updates (same as --set checkpoint_every=N; "
                        "Ctrl-C, SIGTERM or SIGHUP during the loop writes one)")
    r.add_argument("--trust-pickle", action="store_true",
                   help="allow reading pickled files (CIFAR-10 python batches) from a trusted source")
    r.add_argument("--device", metavar="NAME",
                   help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps (same as --set device=NAME)")
    r.add_argument("--dtype", metavar="NAME",
                   help="float32, float64 or, for the diffusion experiments, bfloat16: autocast network forwards "
                        "with float32 master weights (same as --set dtype=NAME)")


def _run(args: argparse.Namespace) -> int:
    from . import distributed
    from .errors import ConfigError
    from .experiments import EXPERIMENTS, pretrain
    from .runtime.config import build_config, load_config_file, parse_overrides
    from .runtime.runner import default_run_dir, execute

    if args.command == "pretrain":
        name, experiment = "pretrain", pretrain
        sources = [{"dataset": args.dataset}]
    else:
        name, experiment = args.experiment, EXPERIMENTS[args.experiment]
        sources = [] if args.preset is None else [_preset(name, experiment, args.preset)]
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out must name a directory, got an empty string (omit it for runs/NAME-TIMESTAMP)")
    if args.config:
        sources.append(load_config_file(args.config))
    sources.append(parse_overrides(args.overrides))
    if args.seed is not None:
        sources.append({"seed": args.seed})
    shorthands = {"progress": False if args.no_progress else None, "data": args.data,
                  "trust_pickle": True if args.trust_pickle else None, "reward": getattr(args, "reward", None),
                  "sweep": True if getattr(args, "sweep", False) else None,
                  "checkpoint_every": getattr(args, "checkpoint_every", None),
                  "diffusers_model": getattr(args, "diffusers_model", None), "device": args.device,
                  "dtype": args.dtype}
    sources.append({k: v for k, v in shorthands.items() if v is not None})
    config = build_config(experiment.Config, *sources)
    sharded = distributed.init_from_env()  # under torchrun: join the process group
    try:
        if sharded and args.out is None:
            raise ConfigError("under torchrun, name the output directory with --out DIR (the same for all processes)")
        run_dir = args.out or default_run_dir(name)
        args.run_dir_used = run_dir  # where a crash's traceback goes
        start = time.perf_counter()
        result, files = execute(experiment, config, run_dir, name=name, tensorboard=args.tensorboard)
        if distributed.is_main():
            _report(name, experiment, config, result, files, run_dir, start)
        if sharded:  # every process is done with its collectives before the group goes away
            import torch.distributed as dist

            dist.barrier()
    finally:
        if sharded:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _preset(name: str, experiment, preset: str) -> dict:
    from .errors import ConfigError

    presets = getattr(experiment, "PRESETS", {})
    if preset not in presets:
        allowed = f"available: {', '.join(presets)}" if presets else "it has none"
        raise ConfigError(f"unknown preset {preset!r} for {name}; {allowed}")
    return presets[preset]


def _resume(args: argparse.Namespace) -> int:
    from .experiments import EXPERIMENTS, pretrain
    from .runtime.runner import resume

    jobs = {**EXPERIMENTS, "pretrain": pretrain}
    start = time.perf_counter()
    name, config, result, files = resume(args.run_dir, jobs, device=args.device)
    _report(name, jobs[name], config, result, files, args.run_dir, start)
    return 0


def _report_command(args: argparse.Namespace) -> int:
    from .runtime.report import write_report

    if args.out is not None and not args.out.strip():
        print("implicit-diffusion: error: --out must name a directory, got an empty string", file=sys.stderr)
        return 2
    if args.out is None and len(args.run_dirs) > 1:
        print("implicit-diffusion: error: comparing several runs needs --out DIR", file=sys.stderr)
        return 2
    out = args.out or f"{args.run_dirs[0].rstrip('/')}/report"
    files = write_report(args.run_dirs, out)
    print(f"wrote {out}/: {', '.join(files)}")
    return 0


def _report(name, experiment, config, result, files, run_dir, start: float) -> None:
    print(f"{name} (seed {config.seed})")
    print(experiment.table(result))
    print(f"  wall time, run and outputs (after start-up): {time.perf_counter() - start:.2f} s "
          f"(CPU time of this process: {time.process_time():.2f} s)")
    print(f"wrote {run_dir}/: {', '.join(files)}")


def _list(args: argparse.Namespace) -> int:
    from .experiments import EXPERIMENTS, pretrain
    from .runtime.settings import experiment_summary, render_markdown

    jobs = {**dict(sorted(EXPERIMENTS.items())), "pretrain": pretrain}
    if args.markdown:
        print(render_markdown(jobs), end="")
        return 0
    if args.name is not None:
        print(_settings_text(args.name))
        return 0
    width = max(len(f"run {name}") for name in jobs)
    for name, module in jobs.items():
        title = "pretrain DATASET" if name == "pretrain" else f"run {name}"
        print(f"{title:<{width}}  {experiment_summary(module)}")
        for preset in getattr(module, "PRESETS", {}):
            print(f"{'':<{width}}  --preset {preset}")
    print("\n`implicit-diffusion list NAME` (or `run NAME --help`) shows every setting of one, with its meaning")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``implicit-diffusion`` command; returns the exit code (0; 2: bad input, one line; 1: a fault
    of the machine (full disk, permissions), one line, or an unexpected error, one line naming the
    file its traceback was written to (the run directory, else the temporary directory); 128 + the
    signal after a stop signal with a checkpoint written: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP; 130:
    interrupted without one). No traceback reaches the terminal."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list(args)
        if args.command == "report":
            return _report_command(args)
        return _resume(args) if args.command == "resume" else _run(args)
    except ImplicitDiffusionError as e:
        print(f"implicit-diffusion: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's fault (full disk, permissions): one line, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"implicit-diffusion: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        from .runtime.checkpoints import RunInterrupted

        if isinstance(e, RunInterrupted):
            print(f"implicit-diffusion: {e}; continue with: implicit-diffusion resume {e.path.parent}",
                  file=sys.stderr)
            return 128 + e.signum  # 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP
        print("implicit-diffusion: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or a fault nobody foresaw: one line here, the traceback in a file
        path = _write_traceback(e, _traceback_dir(args))
        print(f"implicit-diffusion: internal error: {type(e).__name__}: {_one_line(e)}; the full traceback "
              f"is in {path} (please include it in a bug report)", file=sys.stderr)
        return 1


def _one_line(e: BaseException, limit: int = 2000) -> str:
    """The exception's message on one line, at most ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def _traceback_dir(args: argparse.Namespace):
    """Where an unexpected error's traceback goes: the run directory when there is one, else the
    system's temporary directory."""
    import tempfile
    from pathlib import Path

    run_dir = getattr(args, "run_dir_used", None) or getattr(args, "run_dir", None)
    if run_dir and Path(run_dir).is_dir():
        return Path(run_dir)
    return Path(tempfile.gettempdir())


def _write_traceback(e: BaseException, where) -> str:
    """Write ``e``'s traceback to ``where/traceback[-rankR]-TIMESTAMP-PID.txt``; returns the path (or a
    note when even that cannot be written)."""
    import os
    import traceback

    from . import distributed

    rank = f"-rank{distributed.rank()}" if distributed.active() else ""
    path = where / f"traceback{rank}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        path.write_text("".join(traceback.format_exception(e)), encoding="utf-8")
    except OSError as write_error:
        return f"(nowhere: writing {path} failed: {write_error.strerror or write_error})"
    return str(path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
