"""The source type-checks: ``mypy`` over every package folder, with the settings in pyproject.toml.

The public API's annotations are what users' own type checkers see, so the same run also checks a snippet of user
code that misuses ``vqfr.load_model``'s result: its return type is :class:`vqfr.models.Network` (with ``options``
and ``patch``), not a bare ``nn.Module``, so the misuse is caught.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PACKAGES = ["vqfr", "kernels", "export", "deploy", "training"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")

USER_CODE = """import vqfr

model = vqfr.load_model("VQFR_v2.pth")
arch: str = model.options["type"]
patch: str = model.patch
"""


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory) -> list[str]:
    """The error lines of one mypy run over the packages and ``user_code.py`` (one run: it takes ~30 s cold)."""
    user = tmp_path_factory.mktemp("typing") / "user_code.py"
    user.write_text(USER_CODE)
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--config-file",
                             str(ROOT / "pyproject.toml"), *PACKAGES, str(user)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert "error:" in result.stdout or result.returncode == 0, result.stdout + result.stderr  # mypy itself ran
    return [line for line in result.stdout.splitlines() if ": error:" in line]


def test_packages_type_check(mypy_errors):
    ours = [line for line in mypy_errors if "user_code.py" not in line]
    assert not ours, "\n".join(ours)


def test_load_model_is_typed_for_callers(mypy_errors):
    # The one error is the int assigned to a str: options is a dict of Any, patch an int.
    user = [line for line in mypy_errors if "user_code.py" in line]
    assert len(user) == 1 and "user_code.py:5:" in user[0] and '"int"' in user[0], "\n".join(user)
