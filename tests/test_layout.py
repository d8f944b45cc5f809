"""The package's layout holds: imports flow one way, and the library runs without the run machinery.

Layers, lowest first (README, "Layout"):

1. the library — ``models``, ``samplers``, ``objectives``, ``algorithms``, ``training``, ``data``,
   ``pretrained``, ``metrics`` and what they share (``errors``, ``_checks``, ``distributed``,
   ``serialization``, ``devices``), and the package root (the public API);
2. the run machinery (``runtime``) and the figures (``plotting``; figures never import the run machinery);
3. the experiments;
4. the command line (``cli``, ``__main__``).

A module may import its own layer or a lower one. Inside the library, the shared base imports only
itself, and ``models``, ``samplers``, ``objectives``, ``data`` and ``metrics`` import no
``algorithms``, ``training`` or ``pretrained``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import implicit_diffusion

PACKAGE = "implicit_diffusion"
ROOT = Path(implicit_diffusion.__file__).parent

BASE = {"errors", "_checks", "distributed", "serialization", "devices"}
LOWER_LIBRARY = {"models", "samplers", "objectives", "data", "metrics"}
UPPER_LIBRARY = {"algorithms", "training", "pretrained"}
LAYERS = {"runtime": 2, "plotting": 2, "experiments": 3, "cli": 4, "__main__": 4}


def _top(module: str) -> str:
    """The first component below the package: ``implicit_diffusion.models.io`` → ``models``, the root → ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer(module: str) -> int:
    return LAYERS.get(_top(module), 1)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_sources() -> dict[str, tuple[str, bool]]:
    """Every module of the package: name → (source, is a package ``__init__``)."""
    return {_module_name(p): (p.read_text(encoding="utf-8"), p.name == "__init__.py")
            for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, source: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module of the package) for every import statement, at any depth (lazy ones too)."""
    found = []
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:  # ``from . import distributed``: the module, when it is one
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
    return found


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every import against the flow, as ``"module:line imports target (why)"``."""
    known = set(sources)
    out = []
    for name, (source, is_package) in sources.items():
        for line, target in imports_of(name, source, is_package, known):
            a, b = _top(name), _top(target)
            why = None
            if layer(target) > layer(name):
                why = f"layer {layer(target)} above layer {layer(name)}"
            elif a == "plotting" and b == "runtime":
                why = "figures do not use the run machinery"
            elif a in BASE and b not in BASE:
                why = "the shared base imports only itself"
            elif a in LOWER_LIBRARY and b in UPPER_LIBRARY:
                why = f"{a} must not depend on {b}"
            if why:
                out.append(f"{name}:{line} imports {target} ({why})")
    return out


def test_imports_flow_one_way():
    assert violations(package_sources()) == []


def test_the_checker_finds_imports_against_the_flow():
    """Negative controls, one per rule: a model importing the run machinery (relative, lazy), a figure
    importing an experiment, a figure importing the run machinery, the shared base importing a model,
    a sampler importing the algorithms."""
    sources = package_sources()
    serialization, _ = sources["implicit_diffusion.serialization"]
    planted = {
        "implicit_diffusion.models.planted": ("def f():\n    from ..runtime.config import build_config\n", False),
        "implicit_diffusion.plotting.planted": ("from implicit_diffusion.experiments import rates\n", False),
        "implicit_diffusion.plotting.planted2": ("from ..runtime import report\n", False),
        "implicit_diffusion.serialization": (serialization + "\nfrom .models import UNet\n", False),
        "implicit_diffusion.samplers.planted": ("from .. import algorithms\n", False),
    }
    found = sorted(v.split(":")[0] + " " + v.split("(")[-1] for v in violations({**sources, **planted}))
    assert found == [
        "implicit_diffusion.models.planted layer 2 above layer 1)",
        "implicit_diffusion.plotting.planted layer 3 above layer 2)",
        "implicit_diffusion.plotting.planted2 figures do not use the run machinery)",
        "implicit_diffusion.samplers.planted samplers must not depend on algorithms)",
        "implicit_diffusion.serialization the shared base imports only itself)",
    ]


def test_the_library_runs_without_the_run_machinery_matplotlib_or_tqdm():
    """In a fresh interpreter where importing matplotlib, tqdm, the run machinery, the figures, the
    experiments or the CLI fails, every library module imports, and a single-loop run, a diffusion
    queue update and a denoising-score-matching step work."""
    blocked = ["matplotlib", "tqdm", f"{PACKAGE}.runtime", f"{PACKAGE}.plotting", f"{PACKAGE}.experiments",
               f"{PACKAGE}.cli"]
    library = sorted(n for n in package_sources() if layer(n) == 1)
    script = textwrap.dedent(f"""
        import importlib, sys
        for name in {blocked!r}:
            sys.modules[name] = None  # import fails: ModuleNotFoundError
        for name in {library!r}:
            importlib.import_module(name)
        import torch
        from implicit_diffusion import (DiffusionQueue, FunctionPotential, RewardEstimator, SingleLoop, VPSchedule)
        from implicit_diffusion.samplers import euler_maruyama_step
        from implicit_diffusion.training import pretrain_score_model
        from implicit_diffusion.models import ScoreMLP

        g = torch.Generator().manual_seed(0)
        V = FunctionPotential(lambda x, th: 0.5 * ((x - th) ** 2).sum(-1), torch.zeros(2))
        algo = SingleLoop(V, RewardEstimator(lambda x: x[:, 0]), torch.optim.SGD(V.parameters(), lr=0.1),
                          step_size=0.1)
        algo.run(torch.randn(100, 2, generator=g), 20, generator=g)
        assert V.theta[0] > 0  # the reward pulls θ₁ up

        model = ScoreMLP(2, hidden=16, depth=2)
        schedule = VPSchedule("linear", num_steps=4)
        queue = DiffusionQueue(model, euler_maruyama_step, schedule, torch.optim.Adam(model.parameters(), lr=1e-3),
                               init_fn=lambda gen: torch.randn(8, 2, generator=gen),
                               reward_fn=lambda x: -x.pow(2).sum(-1), prediction=model.prediction)
        queue.run(6, generator=g)
        info = pretrain_score_model(model, torch.randn(64, 2, generator=g), schedule, num_steps=3, batch_size=16,
                                    generator=g)
        assert info.losses.shape == (3,)
        loaded = [m for m in sys.modules if m.split(".")[0] in ("matplotlib", "tqdm")
                  or m.startswith(("implicit_diffusion.runtime", "implicit_diffusion.plotting",
                                   "implicit_diffusion.experiments", "implicit_diffusion.cli"))]
        assert all(sys.modules[m] is None for m in loaded), loaded
        for name in ("tqdm", "implicit_diffusion.runtime.progress"):  # the block is real
            try:
                importlib.import_module(name)
            except ImportError:
                pass
            else:
                raise AssertionError(f"{{name}} imported although blocked")
        print("library ok:", {len(library)}, "modules")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("library ok")


def test_the_readme_layout_names_every_package_and_shared_module():
    """The README's Layout section cannot drift: it names every subpackage and top-level module."""
    readme = (ROOT.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    names = sorted({_top(n) for n in package_sources() if _top(n) not in ("", "__main__")})
    missing = [n for n in names if f"{n}/" not in section and f"{n}.py" not in section]
    assert missing == []
