"""What every exporter starts from: the model, its engine signature, example inputs and dynamic shapes.

Engines take ``input`` [B, 3, H, W] float32 in [-1, 1] (and, for v2, ``fidelity`` [B] float32) and return ``output``
[B, 3, H, W] float32, the restored faces in [-1, 1] space, unclamped. The batch is dynamic unless fixed. v2 fixes H
and W to its latent grid (``quantizer_opt.spatial_size`` x 32, 512 for the released model); v1 takes any multiple
of 32, optionally with dynamic H and W.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

import vqfr
from vqfr.errors import ConfigError, OutputError
from vqfr.models import Network
from vqfr.sidecar import TensorSpec, sidecar_path

__all__ = ["EXPORTABLE", "ExportSpec", "load_source_model", "randomize_", "engine_module", "export_spec",
           "check_inputs", "add_model_arguments", "refuse_overwriting_inputs", "config_file", "check_output",
           "check_writable_folder", "check_v1_side"]

#: Architectures that export (the VQGAN codebook models are training-stage models, not restorers).
EXPORTABLE = ("VQFRv1", "VQFRv2")
M = TypeVar("M", bound=nn.Module)

#: Example batch for a dynamic batch: torch.export specialises sizes 0 and 1, so trace with 2.
_TRACE_BATCH = 2


def randomize_(model: M, seed: int) -> M:
    """Seeded, non-trivial random weights (for testing exports without a checkpoint), in place.

    Conv/linear weights N(0, 1/fan_in), biases N(0, 0.05), norm scales 1 + N(0, 0.1), codebooks N(0, 1). The
    official initialisation (zero biases, unit norms, tiny codebooks) would hide numerical differences.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            elif p.dim() == 1:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p[0].numel()) ** 0.5)
    return model


def refuse_overwriting_inputs(output: str | Path, *inputs: str | Path | None) -> None:
    """Refuse an ``output`` that is, or whose sidecar is, one of the export's existing ``inputs`` or an input's
    sidecar (exporters never modify their inputs: ``-o VQFR_v2.pth`` would replace the checkpoint, and ``-o
    model.onnx.json`` the sidecar that describes the ONNX).

    Raises:
        OutputError: ``output`` or its sidecar is the same file as an input or an input's sidecar.
    """
    for given in (Path(p) for p in inputs if p is not None):
        for existing in (given, sidecar_path(given)):
            for target in (Path(output), sidecar_path(output)):
                try:
                    same = target.exists() and existing.exists() and target.samefile(existing)
                except OSError:  # unreadable: the write itself reports it
                    same = False
                if same:
                    raise OutputError(f"the output would overwrite the input {existing}", path=target,
                                      fix="choose another output path (-o)")


def config_file(config: Any) -> Path | None:
    """The file that a ``--config`` (``config=``) value names, an input of the export like the weights; None for a
    version alias (``"v2"``) or a dict."""
    from vqfr.models import ALIASES

    if isinstance(config, Path) or (isinstance(config, str) and config not in ALIASES):
        return Path(config).expanduser()  # as vqfr.models reads it
    return None


def check_output(output: str | Path, backend: str, *inputs: str | Path | None) -> Path:
    """Refuse, before any work is done, an ``output`` that the runtime would not load with ``backend`` (it picks
    the backend by the file's suffix, from :data:`vqfr.backends.BACKENDS`), in a folder that does not exist, that is a
    folder (or whose sidecar's path is one), or that would overwrite one of ``inputs`` (see
    :func:`refuse_overwriting_inputs`).

    Returns:
        ``output`` as a Path.

    Raises:
        ConfigError: the suffix is not one the runtime loads with ``backend``. OutputError: the folder is missing
            or is a file, the output or its sidecar's path is a folder, or it would overwrite an input.
    """
    from vqfr.backends import BACKENDS

    output = Path(output)
    refuse_overwriting_inputs(output, *inputs)
    if output.is_dir():  # before the suffix: "name it results.onnx" would misread what was meant
        raise OutputError("is a folder", path=output, fix="give the path of the file to write (-o)")
    if sidecar_path(output).is_dir():  # found only after the engine had replaced the previous one
        raise OutputError(f"its sidecar {sidecar_path(output).name} would be written over a folder", path=output,
                          fix="move that folder away, or choose another output path (-o)")
    suffixes = tuple(dict.fromkeys(s for e in BACKENDS if e.name == backend for s in e.suffixes))
    if output.suffix not in suffixes:  # as the table spells them (torch wants a lower-case .pt2)
        raise ConfigError(f"the runtime runs {backend} engines from {' or '.join(suffixes)} files (it picks the "
                          f"backend by the suffix), not {output.suffix or 'a name without a suffix'}", path=output,
                          fix=f"name it {output.stem if output.suffix else output.name}{suffixes[0]}")
    check_writable_folder(output, "the output folder", "-o", "output path (-o)")
    return output


def check_writable_folder(output: Path, folder_name: str, flag: str, choice: str) -> None:
    """Refuse, before the export's work (when the result would otherwise be lost), an ``output`` whose folder is
    missing, is a file, or takes no files (read-only, no permission, a full disk: a temporary file is tried there).

    Args:
        output: the file to be written.
        folder_name: how the error calls its folder, e.g. ``"the output folder"``.
        flag: the option that chose ``output``, e.g. ``"-o"``.
        choice: what the fix asks to choose instead, e.g. ``"output path (-o)"``.

    Raises:
        OutputError: naming ``output`` and ``flag``.
    """
    folder = output.parent
    if not folder.is_dir():
        if folder.exists():  # "does not exist, create it" would send the user to make a folder over a file
            raise OutputError(f"{folder_name} {folder} is not a folder", path=output,
                              fix=f"choose another {choice}")
        raise OutputError(f"{folder_name} {folder} does not exist", path=output,
                          fix=f"create it first, or choose another {choice}")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write into {folder} ({exc.strerror or exc})", path=output,
                          fix=f"choose a folder you can write to ({flag}), or fix its permissions") from exc


def load_source_model(weights: str | Path | None, config: Any = None, random_weights: int | None = None) -> Network:
    """The model to export, in eval mode on the CPU.

    Args:
        weights: a released ``.pth`` or ``.safetensors`` checkpoint, or None together with ``random_weights``.
        config: as for :func:`vqfr.load_model` (None guesses from the checkpoint; ``"v1"``/``"v2"``, a dict or a yml
            path). Without weights it defaults to ``"v2"``.
        random_weights: a seed: export seeded random weights instead of a checkpoint (for testing only).

    Raises:
        ConfigError: neither or both of ``weights`` and ``random_weights``, or an architecture that does not export.
    """
    if (weights is None) == (random_weights is None):
        raise ConfigError("pass exactly one of weights and random_weights",
                          fix="export a checkpoint with --weights VQFR_v2.pth; --random-weights SEED exports seeded "
                              "random weights for testing only")
    if weights is not None:
        model = vqfr.load_model(weights, config)
    else:
        assert random_weights is not None
        model = randomize_(vqfr.build_model(config if config is not None else "v2"), random_weights)
    arch = model.options["type"]
    if arch not in EXPORTABLE:
        raise ConfigError(f"{arch} is a training-stage codebook model; only {EXPORTABLE} export as restorers",
                          fix="export a VQFR checkpoint (VQFR_v1-33a1fac5.pth or VQFR_v2.pth)")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class _V1Engine(nn.Module):
    """``output = VQFRv1(input)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - the engine's input name
        return self.model(input)


class _V2Engine(nn.Module):
    """``output = VQFRv2(input, fidelity)`` with one fidelity per image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input: Tensor, fidelity: Tensor) -> Tensor:  # noqa: A002 - the engine's input name
        return self.model(input, fidelity=fidelity)


def engine_module(model: Network) -> nn.Module:
    """Wrap ``model`` with the engine signature (see the module docstring)."""
    return (_V1Engine if model.options["type"] == "VQFRv1" else _V2Engine)(model).eval()


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """Shapes of one export.

    Attributes:
        batch: the fixed batch, or None for a dynamic batch.
        height, width: the example (and, unless ``dynamic_size``, the only) input size.
        dynamic_size: v1 only: H and W are dynamic multiples of 32.
        takes_fidelity: v2 engines have the ``fidelity`` input.
    """

    batch: int | None
    height: int
    width: int
    dynamic_size: bool
    takes_fidelity: bool

    @property
    def face_size(self) -> int:
        return self.height

    def example_inputs(self) -> tuple[Tensor, ...]:
        """Tracing inputs: [B, 3, H, W] and, for v2, [B] (values do not matter)."""
        b = self.batch or _TRACE_BATCH
        x = torch.zeros(b, 3, self.height, self.width)
        return (x, torch.full((b,), 0.5)) if self.takes_fidelity else (x,)

    def dynamic_shapes(self, patch: int) -> dict[str, dict[int, Any]]:
        """``torch.export`` dynamic shapes, keyed by input name."""
        dims: dict[int, Any] = {}
        if self.batch is None:
            dims[0] = torch.export.Dim("batch", min=1)
        if self.dynamic_size:
            dims[2] = patch * torch.export.Dim("height_blocks", min=1)
            dims[3] = patch * torch.export.Dim("width_blocks", min=1)
        shapes: dict[str, dict[int, Any]] = {"input": dims}
        if self.takes_fidelity:
            shapes["fidelity"] = {0: dims[0]} if 0 in dims else {}
        return shapes

    def tensor_specs(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """(inputs, outputs) for the sidecar; -1 marks a dynamic dimension."""
        b = -1 if self.batch is None else self.batch
        h, w = (-1, -1) if self.dynamic_size else (self.height, self.width)
        inputs = [TensorSpec("input", (b, 3, h, w))]
        if self.takes_fidelity:
            inputs.append(TensorSpec("fidelity", (b,)))
        return tuple(inputs), (TensorSpec("output", (b, 3, h, w)),)

    @property
    def input_names(self) -> list[str]:
        return ["input", "fidelity"] if self.takes_fidelity else ["input"]


def check_v1_side(side: int, patch: int, path: str | Path | None = None) -> None:
    """A v1 input side must be a positive multiple of its patch (32).

    Raises:
        ConfigError: with the nearest valid ``--size`` (the smaller one when two are as near).
    """
    if side < patch or side % patch:
        nearest = max(patch, (side + (patch - 1) // 2) // patch * patch)
        raise ConfigError(f"VQFRv1 needs an input side that is a multiple of {patch}, got {side}", path=path,
                          fix=f"pass --size {nearest}")


def export_spec(model: Network, batch: int | None = None, size: int | None = None,
                dynamic_size: bool = False) -> ExportSpec:
    """Validate the requested shapes against the architecture.

    Args:
        model: a VQFRv1 or VQFRv2 model.
        batch: a fixed batch size, or None for a dynamic batch.
        size: v1: the input side (a multiple of 32; default 512). v2: must equal its configured size if given.
        dynamic_size: v1 only: dynamic H and W.

    Raises:
        ConfigError: a size the architecture cannot take.
    """
    if batch is not None and batch < 1:
        raise ConfigError(f"batch must be a positive integer or dynamic, got {batch}", fix="pass --batch 1 or more")
    arch, patch = model.options["type"], model.patch
    if arch == "VQFRv2":
        quantizer: Any = model.quantizer  # L2VectorQuantizer
        grid: tuple[int, int] = quantizer.spatial_size
        height, width = grid[0] * patch, grid[1] * patch
        if dynamic_size:
            raise ConfigError("VQFRv2 predicts a fixed latent grid, so its input size cannot be dynamic",
                              fix=f"drop --dynamic-size; v2 engines take {height}x{width} inputs")
        if size is not None and size != height:
            raise ConfigError(f"VQFRv2 with spatial_size {list(grid)} takes {height}x{width} inputs, not {size}",
                              fix=f"drop --size or pass --size {height}")
        return ExportSpec(batch, height, width, False, True)
    side = 512 if size is None else size
    check_v1_side(side, patch)
    if dynamic_size and side == patch:  # torch.export specialises a dimension whose example size is 1 (block)
        raise ConfigError(f"a dynamic-size graph is traced at --size, which must span at least two {patch}-pixel "
                          f"blocks, got {side}", fix=f"pass --size {2 * patch}: the graph still takes {side}x{side}")
    return ExportSpec(batch, side, side, dynamic_size, False)


def check_inputs(spec: ExportSpec, batch: int | None = None, seed: int = 0) -> tuple[Tensor, ...]:
    """A fixed, deterministic input batch for numerical checks: smooth shading plus noise, in [-1, 1].

    v2 fidelities run from 0 to 1 across the batch, so one check covers the texture-only branch and the full one.
    """
    b = batch or spec.batch or 2
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, spec.height), torch.linspace(-1, 1, spec.width), indexing="ij")
    shade = torch.stack([0.6 * torch.cos(2.0 * xx + c) * torch.sin(1.5 * yy - c) for c in (0.0, 0.7, 1.4)])
    x = (shade + 0.35 * torch.randn(b, 3, spec.height, spec.width, generator=gen)).clamp(-1, 1)
    if not spec.takes_fidelity:
        return (x,)
    return x, torch.linspace(0, 1, b) if b > 1 else torch.ones(1)



def _batch_arg(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'dynamic', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch must be at least 1, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, precisions: tuple[str, ...]) -> None:
    """The options every exporter shares: what to export and with which shapes."""
    parser.add_argument("--weights", type=Path, help="released checkpoint (.pth or .safetensors)")
    parser.add_argument("--random-weights", type=int, metavar="SEED",
                        help="export seeded random weights instead of --weights (testing only; says so in the sidecar)")
    parser.add_argument("--config", help="v1, v2, or a yml or JSON with a network_sr, network_g or network_options "
                                         "block, or the bare options (default: guessed from the weights)")
    parser.add_argument("--precision", choices=precisions, default=precisions[0])
    parser.add_argument("--batch", type=_batch_arg, default=None, help="a fixed batch size or 'dynamic' (default)")
    parser.add_argument("--size", type=int, help="v1 input side, a multiple of 32 (default 512); v2: fixed")
    parser.add_argument("--dynamic-size", action="store_true", help="v1 only: dynamic input height and width")
