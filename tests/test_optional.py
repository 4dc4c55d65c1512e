"""Optional dependencies: a missing or too old one is named with the pip command that fixes it."""

from __future__ import annotations

import re
import sys
import tomllib
import types
from pathlib import Path

import pytest

from vqfr import _optional

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _floors() -> dict[str, str]:
    """{package: floor} of every ``package>=floor`` in pyproject.toml's extras."""
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    return {m[1]: m[2] for reqs in extras.values() for req in reqs if (m := re.fullmatch(r"([\w-]+)>=([\d.]+)", req))}


def test_minimum_versions_are_the_floors_of_the_extras():
    floors = _floors()
    assert {name: floors[name] for name in _optional.MINIMUM} == _optional.MINIMUM


def test_a_package_older_than_its_floor_is_refused_with_the_upgrade(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", types.SimpleNamespace(__version__="0.5.7"))
    with pytest.raises(ImportError, match=r"onnxscript 0\.5\.7 is too old for exporting ONNX graphs .*>= 0\.6.*"
                                          r"pip install -U 'vqfr-deploy\[onnx\]'"):
        _optional.require("onnxscript", "exporting ONNX graphs")
    monkeypatch.setitem(sys.modules, "onnxscript", types.SimpleNamespace(__version__="0.6.0"))
    assert _optional.require("onnxscript", "exporting ONNX graphs").__version__ == "0.6.0"


def test_a_missing_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "polygraphy", None)  # import fails
    with pytest.raises(ImportError, match=r"polygraphy is needed for checking engines .*pip install "
                                          r"'vqfr-deploy\[onnx\]'"):
        _optional.require("polygraphy", "checking engines")
