"""The four official architectures, built from the official option names.

``build_model(options)`` takes a dict with ``type`` in :data:`ARCHS` plus the official arguments, a version alias
(``"v1"``, ``"v2"``, ``"vqgan_v1"``, ``"vqgan_v2"``) or the path of a yml or JSON file (see :func:`read_yml`:
the official yml's ``network_sr``/``network_g`` block, a ``network_options`` block, or bare options). The built
model keeps its options in ``model.options``.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path

import yaml

from vqfr.errors import ConfigError
from vqfr.models.blocks import Network
from vqfr.models.v1 import VQFRv1, VQGANv1
from vqfr.models.v2 import VQFRv2, VQGANv2

ARCHS: dict[str, type[Network]] = {"VQFRv1": VQFRv1, "VQFRv2": VQFRv2, "VQGANv1": VQGANv1, "VQGANv2": VQGANv2}

#: version alias -> the packaged yml holding the official test configuration
ALIASES = {"v1": "vqfr_v1.yml", "v2": "vqfr_v2.yml", "vqgan_v1": "vqgan_v1.yml", "vqgan_v2": "vqgan_v2.yml"}
ALIASES.update({"1": "vqfr_v1.yml", "2": "vqfr_v2.yml", "1.0": "vqfr_v1.yml", "2.0": "vqfr_v2.yml"})
ALIASES.update({arch: f"{arch[:-2].lower()}_{arch[-2:]}.yml" for arch in ARCHS})

__all__ = ["ARCHS", "ALIASES", "Network", "build_model", "resolve_options", "official_options", "VQFRv1", "VQFRv2",
           "VQGANv1", "VQGANv2"]


#: Where a config file keeps the network options, in order: the official yml's blocks (test, train), then the
#: ``network_options`` of a model description such as the golden models' JSON. Else the top level, with ``type``.
_NETWORK_BLOCKS = ("network_sr", "network_g", "network_options")


def _network_block(doc: object, source: str) -> dict:
    if not isinstance(doc, dict):
        raise ConfigError("is not a YAML mapping", path=source, fix="pass an official-style yml")
    for key in _NETWORK_BLOCKS:
        if isinstance(doc.get(key), dict):
            return doc[key]
    if "type" in doc:
        return doc
    raise ConfigError("has no network_sr, network_g or network_options block, nor a top-level type", path=source,
                      fix="pass an official-style yml (e.g. vqfr/configs/vqfr_v2.yml), or put the model options, "
                          "with their type, under network_options")


def read_yml(path: str | Path) -> dict:
    """The network options of a yml or JSON file: its ``network_sr`` block (official test yml), else ``network_g``
    (official train yml), else ``network_options`` (a model description), else the top level (options with
    ``type``)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the config ({exc.strerror})", path=path, fix="check the path") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"is not valid YAML ({exc})", path=path, fix="fix the YAML syntax") from exc
    return _network_block(doc, str(path))


def official_options(alias: str) -> dict:
    """The official test configuration for ``alias`` (e.g. ``"v2"`` or ``"VQGANv1"``)."""
    if alias not in ALIASES:
        raise ConfigError(f"unknown model version {alias!r}", fix=f"use one of {sorted(set(ALIASES))}")
    text = resources.files("vqfr.configs").joinpath(ALIASES[alias]).read_text()
    return _network_block(yaml.safe_load(text), ALIASES[alias])


def resolve_options(options: dict | str | Path) -> dict:
    """Turn any accepted form of options into a fresh dict with ``type``."""
    if isinstance(options, dict):
        opts = copy.deepcopy(options)
    elif isinstance(options, str) and options in ALIASES:
        opts = official_options(options)
    elif isinstance(options, (str, Path)):
        path = Path(options).expanduser()  # the shell leaves the ~ of --config=~/vqfr.yml to us
        if not path.is_file():
            raise ConfigError("is neither a version alias nor an existing yml file", path=options,
                              fix=f"pass one of {sorted(set(ALIASES))} or the path of a yml")
        opts = read_yml(path)
    else:
        raise ConfigError(f"options must be a dict, a version alias or a yml path, not {type(options).__name__}")
    if opts.get("type") not in ARCHS:
        raise ConfigError(f"options 'type' is {opts.get('type')!r}", fix=f"set type to one of {sorted(ARCHS)}")
    return opts


def build_model(options: dict | str | Path) -> Network:
    """Build an architecture with freshly initialised weights (the official initialisation).

    Args:
        options: a dict with ``type`` and the official arguments, a version alias, or the path of a yml or JSON
            file (see :func:`read_yml`).

    Returns:
        The model (train mode, CPU, fp32) with ``model.options`` set.
    """
    opts = resolve_options(options)
    arch = opts["type"]
    kwargs = {k: v for k, v in opts.items() if k != "type"}
    try:
        model = ARCHS[arch](**copy.deepcopy(kwargs))
    except (TypeError, LookupError, ValueError) as exc:  # unknown or missing arguments, nested keys, bad values
        reason = f"missing option {exc}" if isinstance(exc, KeyError) else str(exc)
        source = options if isinstance(options, (str, Path)) and options not in ALIASES else None
        raise ConfigError(f"invalid options for {arch}: {reason}", path=source,
                          fix="compare with vqfr/configs/*.yml") from exc
    model.options = opts
    return model
