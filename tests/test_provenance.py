"""Every third-party data file shipped in the packages has its provenance and licence beside it, and the wheel
carries them. The brief's rule: third-party weights and data only under a licence that allows it, with provenance
and licence noted beside the file."""

import fnmatch
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vqfr", "kernels", "export", "deploy", "training")
DATA_SUFFIXES = {".safetensors", ".jpg", ".jpeg", ".png", ".pt", ".pth", ".onnx", ".npz", ".bin"}


def shipped_data_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
                  if p.suffix.lower() in DATA_SUFFIXES and "__pycache__" not in p.parts)


def notes_beside(path: Path) -> str:
    """The provenance notes in the file's folder (README.md / PROVENANCE.md), joined."""
    return "\n".join(p.read_text() for p in (path.parent / "README.md", path.parent / "PROVENANCE.md") if p.exists())


def test_there_are_data_files_to_check():
    names = {p.name for p in shipped_data_files()}
    assert {"mtcnn.safetensors", "lpips_vgg_v0.1.safetensors", "niqe_pris_params.safetensors"} <= names


@pytest.mark.parametrize("path", shipped_data_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_data_file_has_provenance_and_licence_beside_it(path):
    notes = notes_beside(path)
    assert f"`{path.name}`" in notes, f"{path.relative_to(ROOT)}: no README.md / PROVENANCE.md beside it names it"
    assert "sha256" in notes, f"{path.relative_to(ROOT)}: its provenance note gives no checksum of the source"
    licences = sorted(path.parent.glob("LICENSE*"))
    assert licences or "public domain" in notes.lower(), \
        f"{path.relative_to(ROOT)}: no LICENSE* file beside it and its note does not say it is public domain"
    for licence in licences:
        assert licence.name in notes, f"{licence.relative_to(ROOT)} is not referred to by the provenance note"


def test_wheel_package_data_carries_the_data_and_its_licences():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    needed = [p for d in shipped_data_files() for p in (d, *d.parent.glob("LICENSE*"),
                                                        *d.parent.glob("README.md"), *d.parent.glob("PROVENANCE.md"))]
    missing = [str(p.relative_to(ROOT)) for p in needed if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns)]
    assert not missing, f"pyproject.toml [tool.setuptools.package-data] leaves out {missing}"


def test_the_project_licence_is_an_spdx_expression_with_its_files():
    """setuptools stops building projects whose ``license`` is a TOML table in February 2027: an SPDX string and
    ``license-files`` that hold the project's LICENSE and every third-party licence shipped."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    files = {p for pattern in project["license-files"] for p in ROOT.glob(pattern)}
    shipped = {p for d in shipped_data_files() for p in d.parent.glob("LICENSE*")}
    assert ROOT / "LICENSE" in files and shipped <= files, sorted(str(p) for p in shipped - files)
