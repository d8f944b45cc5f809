"""The API reference (docs/api.md) builds with pdoc, covers the library, and has no broken parts.

pdoc reports problems as Python warnings (a module that does not import, an `__all__` entry that
does not resolve, an annotation it cannot evaluate); an unresolvable cross-reference it renders
as plain code without a word, so the unlinked fully qualified names are checked here.
"""

from __future__ import annotations

import html
import importlib
import pkgutil
import re
import warnings
from pathlib import Path

import pytest

import implicit_diffusion

pdoc = pytest.importorskip("pdoc")  # the dev extra installs it

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BUILD = "python -m pdoc -o docs/api-html "
SERVE = "python -m pdoc implicit_diffusion"
# imported by nobody: the run machinery, the figures and the command line are used through
# `implicit-diffusion`; _checks is private
LEFT_OUT = {"runtime", "plotting", "cli", "__main__", "_checks"}
KEY_NAMES = {
    "implicit_diffusion": ["SingleLoop", "NestedLoop", "DiffusionQueue", "GirsanovKL", "KLToReference",
                           "RewardEstimator", "FunctionPotential", "VPSchedule", "ula_step"],
    "implicit_diffusion.pretrained": ["load_pretrained", "pretrained_path", "PRETRAINED"],
    "implicit_diffusion.models": ["UNet", "ScoreMLP", "EnergyMLP"],
    "implicit_diffusion.experiments.langevin_mixture": ["run"],
}


def documented_modules() -> list[str]:
    """The module list of docs/api.md's build command (the serve command must name the same)."""
    lines = [line.strip() for line in API_MD.read_text(encoding="utf-8").splitlines()]
    build = [line for line in lines if line.startswith(BUILD)]
    serve = [line for line in lines if line.startswith(SERVE)]
    assert len(build) == 1 and len(serve) == 1, "docs/api.md: one build and one serve command"
    modules = build[0].removeprefix(BUILD).split()
    assert serve[0].removeprefix("python -m pdoc ").split() == modules, "build and serve name different modules"
    return modules


def pdoc_warning_is_a_known_false_positive(message: str) -> bool:
    """pdoc cannot evaluate the string annotations of a NamedTuple's generated ``__init__``.

    typing.NamedTuple builds ``__new__`` in a synthetic module (``namedtuple_Name``), so under
    ``from __future__ import annotations`` pdoc evaluates ``'Tensor'`` in an empty namespace and
    warns, though the class body's annotations resolve (and render) fine. Nothing else is excused.
    """
    match = re.match(r"Error parsing type annotation .* for ([\w.]+)\.__init__\. Import of \w+ failed", message)
    if not match:
        return False
    module_name, _, qualname = match.group(1).rpartition(".")
    obj = getattr(importlib.import_module(module_name), qualname, None)
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("api-html")
    modules = documented_modules()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=out)
    return out, modules, [str(w.message) for w in caught]


def test_every_library_module_is_in_the_reference_or_deliberately_left_out():
    modules = set(documented_modules())
    children = {m.name for m in pkgutil.iter_modules(implicit_diffusion.__path__)}
    missing = sorted(name for name in children - LEFT_OUT if f"implicit_diffusion.{name}" not in modules)
    assert not missing, f"add to docs/api.md's pdoc commands or to LEFT_OUT: {missing}"
    experiments = importlib.import_module("implicit_diffusion.experiments")
    for m in pkgutil.iter_modules(experiments.__path__):
        name = f"implicit_diffusion.experiments.{m.name}"
        # a module not in experiments.__all__ is only documented when named in docs/api.md
        assert m.name in experiments.__all__ or name in modules, f"{name} has no page"


def test_pdoc_writes_a_page_for_every_module_with_its_public_names(reference):
    out, modules, _ = reference
    assert (out / "index.html").is_file() and (out / "search.js").is_file()
    for name in modules:
        page = out / f"{name.replace('.', '/')}.html"
        assert page.is_file(), f"no page for {name}"
        text = page.read_text(encoding="utf-8")
        module = importlib.import_module(name)
        absent = [n for n in getattr(module, "__all__", [])
                  if not (out / name.replace(".", "/") / f"{n}.html").is_file()  # a submodule: its own page
                  and f'id="{n}"' not in text]
        assert not absent, f"{name}: names of __all__ missing from its page: {absent}"
    for name, names in KEY_NAMES.items():
        text = (out / f"{name.replace('.', '/')}.html").read_text(encoding="utf-8")
        absent = [n for n in names if f'id="{n}"' not in text]
        assert not absent, f"{name}: key names missing from its page: {absent}"


def test_pdoc_reports_no_problem(reference):
    _, _, messages = reference
    problems = [m for m in messages if not pdoc_warning_is_a_known_false_positive(m)]
    assert not problems, "pdoc warned:\n" + "\n".join(problems)


def resolves(dotted: str) -> bool:
    """Whether ``implicit_diffusion.a.b.C.d`` names a module or an attribute reached from one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_fully_qualified_reference_in_a_docstring_exists(reference):
    out, _, _ = reference
    # pdoc links a reference it can resolve (<a href=...>name</a>) and leaves the others as <code>
    code = re.compile(r"<code>~?(implicit_diffusion(?:\.\w+)+)(?:\(\))?</code>")
    broken = set()
    for page in out.rglob("*.html"):
        for match in code.finditer(page.read_text(encoding="utf-8")):
            name = html.unescape(match.group(1))
            if not resolves(name):
                broken.add(f"{page.relative_to(out)}: {name}")
    assert not broken, "docstrings name objects that do not exist:\n" + "\n".join(sorted(broken))
