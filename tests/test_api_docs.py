"""The Python API documents itself: every public function and class has a docstring, and every
module renders with pydoc (what `help()` and documentation generators read)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import pydoc

import pytest

import implicit_diffusion

OPTIONAL = {"implicit_diffusion.__main__"}  # runs the command line on import
MODULES = sorted(m.name for m in pkgutil.walk_packages(implicit_diffusion.__path__, "implicit_diffusion.")
                 if m.name not in OPTIONAL)


@pytest.mark.parametrize("name", ["implicit_diffusion", *MODULES])
def test_module_has_a_docstring_and_renders(name):
    module = importlib.import_module(name)
    assert inspect.getdoc(module), f"{name} has no module docstring"
    assert name in pydoc.render_doc(module, renderer=pydoc.plaintext)


def test_every_public_function_and_class_is_documented():
    missing = []
    for name in ["implicit_diffusion", *MODULES]:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
                missing.append(f"{name}.{attr}")
    assert not missing, f"undocumented public names: {', '.join(sorted(set(missing)))}"
