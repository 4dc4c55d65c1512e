"""Released checkpoints: the ``{"params"|"params_ema": state_dict}`` ``.pth`` layout and safetensors.

Loading is strict. A mismatch is reported as the missing and unexpected keys (and shape differences), together with
the architecture the file looks like. ``.pth`` files are read with ``torch.load(weights_only=True)``, so a pickle
that would run code is refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vqfr.atomic import atomic_path, atomic_write_bytes
from vqfr.errors import CheckpointError, ConfigError
from vqfr.models import Network, build_model

__all__ = ["load_model", "read_state_dict", "read_weights", "filter_state_dict", "guess_arch", "save_safetensors",
           "save_released", "file_sha256"]

#: A key that only one architecture has, checked in this order.
_SIGNATURES = (
    ("VQFRv1", "main_decoder."),
    ("VQFRv2", "main_branch."),
    ("VQGANv1", "quantizer.quantize_dict."),
    ("VQGANv2", "quantizer.embedding.weight"),
)
_ALIAS_OF = {"VQFRv1": "v1", "VQFRv2": "v2", "VQGANv1": "vqgan_v1", "VQGANv2": "vqgan_v2"}


def guess_arch(keys) -> str | None:
    """The architecture whose characteristic keys appear in ``keys``, or None."""
    keys = list(keys)
    for arch, marker in _SIGNATURES:
        if any(k.startswith(marker) or k == marker for k in keys):
            return arch
    return None


def filter_state_dict(obj: Mapping, param_key: str | None = None) -> dict[str, Tensor]:
    """Released layout -> plain state dict. Idempotent.

    Picks ``param_key`` when given and the file holds it (the official ``param_key_g``), else ``params_ema`` over
    ``params``, when the file is wrapped, and strips any ``module.`` prefixes (DataParallel,
    DistributedDataParallel, or both nested: ``module.module.``).
    A plain state dict is returned unchanged (as a new dict).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a state dict")
    for key in ([param_key] if param_key else []) + ["params_ema", "params"]:
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, Tensor):
            raise CheckpointError(f"entry {k!r} is a {type(v).__name__}, not a tensor")
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def read_state_dict(path: str | Path, param_key: str | None = None) -> tuple[dict[str, Tensor], dict | None]:
    """Read a checkpoint file; ``param_key`` as in :func:`filter_state_dict`.

    Returns:
        (state dict, the model options stored in a safetensors file's metadata, or None).

    Raises:
        CheckpointError: missing, empty, truncated or corrupt file; a pickle holding objects beyond tensors (it could
            run code, so it is refused without being executed); not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise CheckpointError(what, path=path, fix="pass the path of a VQFR .pth or .safetensors file")
    if path.stat().st_size == 0:
        raise CheckpointError("is empty (0 bytes)", path=path, fix="re-download the file")
    if path.suffix.lower() == ".safetensors":  # as the backend table reads suffixes
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():  # torch warns of any pickle protocol above 2; the refusal below says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _pickled_globals(path)
        if found:
            raise CheckpointError(
                f"refused: its pickle calls {', '.join(found[:4])}, which could run code when loaded (only tensors "
                "and plain containers are accepted)",
                path=path,
                fix="use the released weights or a .safetensors file (if you trust this file, load it yourself "
                    "with torch.load and weights_only=False, then re-save it with vqfr.save_safetensors)",
            ) from exc
        raise CheckpointError("is not a readable PyTorch checkpoint (not a pickle of tensors: corrupt, or another kind "
                              "of file)", path=path, fix="re-download the file") from exc
    except Exception as exc:  # torch.load on arbitrary bytes raises many types (RuntimeError, EOFError, KeyError ...)
        raise CheckpointError(f"is not a readable PyTorch checkpoint (truncated or corrupt: {_first_line(exc)})",
                              path=path, fix="re-download the file; it may be truncated") from exc
    try:
        return filter_state_dict(obj, param_key), None
    except CheckpointError as exc:
        raise CheckpointError(str(exc), path=path, fix="pass a checkpoint in the released layout") from exc


def read_weights(path: str | Path, what: str, fix: str) -> dict[str, Tensor]:
    """The state dict of another network's weights file (a face detector's), read as :func:`read_state_dict` reads
    a checkpoint, with its errors reworded for that network.

    Args:
        what: the weights named in the error, e.g. ``"RetinaFace weights"``.
        fix: how to get the right file, given after the reading error's own fix (alone for a missing file).

    Raises:
        ConfigError: ``"cannot read {what}: {reason}"``, naming the file.
    """
    try:
        return read_state_dict(path)[0]
    except CheckpointError as exc:
        own = f"check the path; {fix}" if not Path(path).is_file() else f"{exc.fix}; {fix}"
        raise ConfigError(f"cannot read {what}: {exc.reason}", path=path, fix=own) from exc


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"is not a readable safetensors file ({_first_line(exc)})", path=path,
                              fix="re-download or re-export the file") from exc
    try:
        options = json.loads(meta["options"]) if "options" in meta else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"has malformed model options in its metadata ({exc})", path=path,
                              fix="pass options= (CLI --config) or re-save it with vqfr.save_safetensors") from exc
    if options is not None and not isinstance(options, dict):
        raise CheckpointError(f"has model options of type {type(options).__name__} in its metadata, not a mapping",
                              path=path, fix="pass options= (CLI --config) or re-save it with vqfr.save_safetensors")
    try:
        return filter_state_dict(sd), options
    except CheckpointError as exc:
        raise CheckpointError(str(exc), path=path, fix="pass a checkpoint in the released layout") from exc


def _note_global(found: list[str], name: str) -> None:
    import _compat_pickle

    module, _, attr = name.partition(".")
    name = f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}"  # protocol 2 writes __builtin__ for builtins
    if not name.startswith(("torch.", "collections.OrderedDict")) and name not in found:
        found.append(name)


def _first_line(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception, at most ~120 characters."""
    lines = str(exc).strip().splitlines()
    text = lines[0].split(". ")[0] if lines else ""
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__


def _pickled_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a pickle would import, outside torch's tensor rebuilding (read statically with
    pickletools, never executed). Empty when the file is not a pickle at all."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(member) if member else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return []
    found: list[str] = []
    strings: list[str] = []  # strings pushed so far (STACK_GLOBAL takes the last two)
    memo: dict[int, str] = {}
    last: str | None = None  # the string the previous opcode pushed, if any
    memoized = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            pushed = None
            if op.name in ("GLOBAL", "INST"):
                _note_global(found, str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                _note_global(found, f"{strings[-2]}.{strings[-1]}")
            elif "UNICODE" in op.name or op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                pushed = str(arg)
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                pushed = memo.get(int(str(arg)))
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                index = memoized if op.name == "MEMOIZE" else int(str(arg))
                memoized += op.name == "MEMOIZE"
                if last is not None:
                    memo[index] = last
                continue  # the value stays on the stack: ``last`` is still the top
            if pushed is not None:
                strings.append(pushed)
            last = pushed
    except ValueError:  # the stream is damaged here: report what was found before
        return found
    return found


#: Keys of each kind (missing, unexpected, other shape) that a mismatch error names.
_SHOWN = 2
#: How to give a checkpoint the options it was trained with, in each interface.
_PASS_OPTIONS = "CLI --config FILE.yml, vqfr.Runtime(config=...) or vqfr.load_model(options=...)"


def _mismatch_report(model: nn.Module, sd: dict[str, Tensor]) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return None

    def listing(title: str, items: list[str]) -> str:  # the count and a few examples: a line, not a page
        shown = ", ".join(items[:_SHOWN]) + (f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")
        return f"{len(items)} {title}: {shown}"

    parts = [listing(t, i) for t, i in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("shape mismatches", shapes)) if i]
    return "; ".join(parts)


def load_model(
    checkpoint: str | Path,
    options: dict | str | Path | None = None,
    device: str | torch.device = "cpu",
) -> Network:
    """Load a released-layout checkpoint strictly into its architecture.

    Args:
        checkpoint: a ``.pth`` (``{"params": ...}`` and/or ``{"params_ema": ...}``, or a plain state dict; any
            ``module.`` prefix is stripped) or a ``.safetensors`` file.
        options: None (guess the version from the keys and use its official test configuration, or the options
            stored in a safetensors file), ``"v1"``/``"v2"``/``"vqgan_v1"``/``"vqgan_v2"``, a dict, or the path of a
            yml or JSON file (:func:`vqfr.models.read_yml`).
        device: where to put the model.

    Returns:
        The model in eval mode with ``model.options`` set and ``model.weights_path`` the checkpoint path.

    Raises:
        CheckpointError: unreadable or unsafe file, or keys/shapes that do not match the architecture; the message
            lists the differences and says which version the file looks like.
    """
    path = Path(checkpoint)
    sd, stored = read_state_dict(path)
    looks_like = guess_arch(sd)
    from_metadata = options is None and stored is not None
    if options is None:
        if stored is not None:
            options = stored
        elif looks_like is None:
            raise CheckpointError("has none of the keys of a VQFR or VQGAN model", path=path,
                                  fix="pass a VQFR checkpoint (e.g. VQFR_v2.pth)")
        else:
            options = _ALIAS_OF[looks_like]
    try:
        model = build_model(options)
    except ConfigError as exc:
        if not from_metadata:
            raise
        raise CheckpointError(f"has invalid model options in its metadata ({exc.reason})", path=path,
                              fix="pass options= (CLI --config) or re-save it with vqfr.save_safetensors") from exc
    opts = model.options
    problem = _mismatch_report(model, sd)
    if problem:
        hint = f"the file looks like {looks_like}" if looks_like else "the file matches no known architecture"
        fix = (f"load it with options={_ALIAS_OF[looks_like]!r}, or pass the options it was trained with: "
               f"{_PASS_OPTIONS}" if looks_like and looks_like != opts["type"]
               else f"pass the options it was trained with: {_PASS_OPTIONS}")
        built = " built from the options in its metadata" if from_metadata else ""
        raise CheckpointError(f"does not match {opts['type']}{built} ({hint}): {problem}", path=path, fix=fix)
    model.load_state_dict(sd, strict=True)
    model.weights_path = str(path)
    return model.eval().to(device)


def save_safetensors(model: nn.Module, path: str | Path) -> Path:
    """Save ``model``'s weights and options to a ``.safetensors`` file (atomically). Returns the path."""
    from safetensors.torch import save

    path = Path(path)
    meta = {"format": "vqfr-weights/1"}
    options: Any = getattr(model, "options", None)
    if options is not None:
        meta["arch"] = options["type"]
        meta["options"] = json.dumps(options)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, _metadata_sorted(save(sd, metadata=meta)))
    return path


def _metadata_sorted(blob: bytes) -> bytes:
    """A safetensors file with its ``__metadata__`` entries in sorted order, so the same weights and options always
    give the same bytes (and sha256): safetensors writes them in hash-map order, which varies from call to call.

    The layout is an 8-byte little-endian header length, the JSON header padded with spaces to a multiple of 8
    bytes, then the tensor data, which the header addresses by offset and so does not move.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n:]


def save_released(path: str | Path, params: Mapping[str, Tensor],
                  params_ema: Mapping[str, Tensor] | None = None) -> Path:
    """Save state dicts in the released ``.pth`` layout (``params`` and optionally ``params_ema``), atomically."""
    path = Path(path)
    obj = {"params": {k: v.detach().cpu() for k, v in params.items()}}
    if params_ema is not None:
        obj["params_ema"] = {k: v.detach().cpu() for k, v in params_ema.items()}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

