"""The embedded demo photo (public domain; see PROVENANCE.md)."""

from importlib import resources
from pathlib import Path


def demo_photo() -> Path:
    """Path of the packaged demo photo: a degraded 512x512 whole photo with one face."""
    return Path(str(resources.files(__name__).joinpath("astronaut_degraded.jpg")))
