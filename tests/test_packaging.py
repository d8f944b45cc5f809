"""The package metadata agrees with itself, and the wheel ships what an installed user needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_metadata_matches_the_license_file():
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"  # an SPDX expression (PEP 639), not a table
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "the implicit-diffusion developers" in text
    assert not any("License ::" in c for c in project.get("classifiers", [])), "PEP 639: no license classifier"


def test_py_typed_marker_is_package_data():
    assert (ROOT / "src" / "implicit_diffusion" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["implicit_diffusion"]


def test_pdoc_is_in_the_dev_extra():
    dev = PYPROJECT["project"]["optional-dependencies"]["dev"]
    assert any(req.replace(" ", "").startswith("pdoc>=") for req in dev)


@pytest.mark.slow
def test_the_wheel_ships_py_typed_the_license_and_the_pretrained_models(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info next to the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "wheel"),
                           str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("implicit_diffusion-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "implicit_diffusion/py.typed" in names
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert f"{dist_info}/licenses/LICENSE" in names
    assert {"implicit_diffusion/pretrained/digits.safetensors",
            "implicit_diffusion/pretrained/mnist5k.safetensors"} <= names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata and "License-File: LICENSE" in metadata
