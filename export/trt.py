"""Build a TensorRT engine from an exported ONNX file: ``python -m export.trt vqfr_v2.onnx -o vqfr_v2.engine``.

- The ONNX parser maps ``DeformConv`` to TensorRT's ``ModulatedDeformConv2d`` plugin (TensorRT >= 10.1), so the
  plugin library is initialised first.
- One optimisation profile covers the batch (``--min-batch/--opt-batch/--max-batch``); v1 graphs with dynamic H
  and W are built for one size (``--size``, default the sidecar's face size).
- Precision follows the ONNX file. An fp16 ONNX (``export.onnx --precision fp16``) builds a strongly typed network:
  the fp32 islands written in the graph are obeyed, which is the only fp16 route on TensorRT 11 (it has no fp16
  builder flag). An fp32 ONNX with ``--fp16`` uses TensorRT 10's weakly typed fp16 mode, with the same islands
  pinned to fp32 by layer precision constraints.
- The DeformConv plugin's fp16 kernel rounds the sampling coordinates to fp16 (0.25 px steps at 256-512 px), so
  deformable convolutions stay fp32 unless ``--dcn-fp16``.
- fp32 engines disable TF32 unless ``--tf32``: TF32 rounds convolution inputs to 10-bit mantissas.
- The timing cache is loaded from and saved to ``--timing-cache``. ``--version-compatible`` builds an engine that
  later TensorRT versions can run, with the plugin library serialised into it.

The sidecar (``model.engine.json``) extends the ONNX one with the TensorRT version, GPU and compute capability.
``--check`` compares the engine with onnxruntime through polygraphy on random and sample inputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export import metadata
from export.compare import Agreement, agreement
from export.source import check_output, check_v1_side, check_writable_folder, refuse_overwriting_inputs
from vqfr._optional import require
from vqfr.atomic import atomic_write_bytes
from vqfr.errors import ConfigError, EngineError, OutputError, run_command
from vqfr.sidecar import EngineMeta, TensorSpec, read_sidecar, sidecar_path, verify_engine_file, write_sidecar

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["build_engine", "BuildOptions", "check_engine", "tensorrt_available", "main", "FP16_MIN_PSNR",
           "FP32_MAX_ABS"]

#: ``--check`` fails below this PSNR (dB) for fp16 engines ...
FP16_MIN_PSNR = 45.0
#: ... and above this max abs error for fp32 engines (times the output's peak if above 1; TensorRT and onnxruntime
#: choose different conv algorithms).
FP32_MAX_ABS = 1e-3
_PURPOSE = "building TensorRT engines"
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^|\]]+?)\s*[|\]]")


def _tensorrt() -> Any:
    """The tensorrt module, or an ImportError that names the pip extra.

    tensorrt-stubs installs a ``tensorrt/`` folder of ``.pyi`` files, which Python imports as an empty namespace
    package; that is not TensorRT.
    """
    module = require("tensorrt", _PURPOSE)
    if not hasattr(module, "Builder"):
        where = ", ".join(getattr(module, "__path__", [])) or "?"
        raise ImportError(f"tensorrt is needed for {_PURPOSE} but only its type stubs are installed ({where}). "
                          "Install it with: pip install 'vqfr-deploy[trt]'")
    return module


def tensorrt_available() -> bool:
    """True when the real TensorRT Python package imports (type stubs alone do not count)."""
    try:
        _tensorrt()
    except ImportError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How to build an engine (see the module docstring).

    Attributes:
        fp16: fp16 kernels for an fp32 ONNX (TensorRT 10 only); an fp16 ONNX is fp16 regardless.
        min_batch, opt_batch, max_batch: the optimisation profile over the batch.
        size: H and W for a v1 ONNX with dynamic size (default: the sidecar's face size).
        timing_cache: a file to load the timing cache from (if it exists) and save it to.
        workspace_gb: the builder's workspace limit, in GiB (default: TensorRT's, the GPU's memory).
        version_compatible: build an engine that later TensorRT versions can run.
        dcn_fp16: let the DeformConv plugin run in fp16.
        tf32: allow TF32 in fp32 layers.
    """

    fp16: bool = False
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    size: int | None = None
    timing_cache: Path | None = None
    workspace_gb: float | None = None
    version_compatible: bool = False
    dcn_fp16: bool = False
    tf32: bool = False

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"need 1 <= min-batch <= opt-batch <= max-batch, got {self.min_batch}, "
                              f"{self.opt_batch}, {self.max_batch}",
                              fix="e.g. --min-batch 1 --opt-batch 4 --max-batch 8")
        if self.workspace_gb is not None and not 0 < self.workspace_gb < math.inf:  # nan fails both
            raise ConfigError(f"workspace must be a positive number, got {self.workspace_gb} GB",
                              fix="e.g. --workspace 4")


def _major(trt_module: Any) -> int:
    return int(str(trt_module.__version__).split(".")[0])


def _onnx_bytes(onnx_path: Path, meta: EngineMeta, options: BuildOptions) -> tuple[bytes, set[str]]:
    """The graph to parse (DeformConv moved to fp16 if asked) and the names of its fp32-island nodes.

    Raises:
        EngineError: the file is not an ONNX model (e.g. the ``.pt2`` or ``.engine`` of another exporter, whose
            sidecar reads like the ONNX one).
    """
    from google.protobuf.message import DecodeError

    from export import fp16

    ir = require("onnxscript", _PURPOSE).ir
    try:
        model = ir.load(onnx_path)
    except (DecodeError, ValueError) as exc:
        raise EngineError(f"is not an ONNX model ({type(exc).__name__}: {exc})", path=onnx_path,
                          fix="pass the .onnx file written by python -m export.onnx") from exc
    if options.dcn_fp16 and meta.precision == "fp16":
        fp16.dcn_to_fp16(model)
    names = fp16.fp32_node_names(model)
    return ir.to_proto(model).SerializeToString(), names


def _check_onnx_file(onnx_path: Path) -> None:
    """Refuse a missing ONNX file before its sidecar is read (else the missing sidecar would be blamed)."""
    if not onnx_path.is_file():
        raise EngineError("is not a file" if onnx_path.exists() else "does not exist", path=onnx_path,
                          fix="pass the .onnx file written by python -m export.onnx")


def _engine_sidecar(onnx_path: Path, options: BuildOptions) -> EngineMeta:
    """The sidecar of the engine to build: the ONNX file's (checked against the file, as the runtime checks it), with
    the input size the engine is built for: a v1 graph with dynamic H and W is built for one size (``options.size``,
    default the face size), which the engine's sidecar then records.

    Raises:
        EngineError: the ONNX is missing, has no readable sidecar, or changed since its sidecar was written (a
            stale sidecar would describe the engine wrongly).
        ConfigError: ``options.size`` differs from the size of a graph without dynamic H and W, or is not a multiple
            of the v1 patch.
    """
    _check_onnx_file(onnx_path)
    meta = read_sidecar(onnx_path)
    verify_engine_file(onnx_path, meta)
    if all(d >= 0 for d in meta.inputs[0].shape[2:]):
        if options.size is not None and options.size != meta.face_size:
            raise ConfigError(f"--size {options.size} asked, but this ONNX takes {meta.face_size}x{meta.face_size} "
                              "inputs only", path=onnx_path,
                              fix="drop --size, or export a v1 ONNX with --dynamic-size (or --size N)")
        return meta
    size = meta.face_size if options.size is None else options.size
    patch = int(meta.options.get("proj_patch_size", 32))
    check_v1_side(size, patch, onnx_path)

    def at_size(t: TensorSpec) -> TensorSpec:
        return dataclasses.replace(t, shape=tuple(size if axis >= 2 and d < 0 else d for axis, d in enumerate(t.shape)))

    return dataclasses.replace(meta, face_size=size, inputs=tuple(map(at_size, meta.inputs)),
                               outputs=tuple(map(at_size, meta.outputs)), extra={**meta.extra, "dynamic_size": False})


def _profile_shapes(network: trt.INetworkDefinition, meta: EngineMeta,
                    options: BuildOptions) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) shape of every network input: a dynamic batch over the profile, dynamic H/W at one size;
    static dimensions (such as a batch fixed at export) as they are, since a profile may not change them."""
    size = options.size or meta.face_size
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = [tensor.shape[axis] for axis in range(len(tensor.shape))]
        per_bound = []
        for batch in (options.min_batch, options.opt_batch, options.max_batch):
            shape = [d if d >= 0 else (batch if axis == 0 else size) for axis, d in enumerate(dims)]
            per_bound.append(shape)
        shapes[tensor.name] = (per_bound[0], per_bound[1], per_bound[2])
    return shapes


def _pin_fp32_islands(network: trt.INetworkDefinition, fp32_nodes: set[str], dcn_fp16: bool) -> int:
    """Weakly typed fp16 builds: constrain the layers of the fp32 islands to fp32; returns how many."""
    import tensorrt as trt

    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        sources = set(_ONNX_LAYER.findall(layer.metadata)) | {layer.name}
        is_plugin = layer.type in (trt.LayerType.PLUGIN_V2, trt.LayerType.PLUGIN_V3)
        keep = (layer.type in (trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX)
                or (is_plugin and not dcn_fp16)
                or (bool(sources & fp32_nodes) and not (is_plugin and dcn_fp16)))
        if not keep:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float32, trt.float16):
                layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _check_timing_cache_path(path: Path) -> None:
    """Refuse, before the build, a timing cache that could not be saved after it (the save comes before the engine is
    written, so a build of minutes would be lost).

    Raises:
        OutputError: ``path`` is a folder, or its folder is missing, is a file or takes no files.
    """
    if path.is_dir():
        raise OutputError("is a folder", path=path, fix="give --timing-cache the path of a file, e.g. trt.cache")
    check_writable_folder(path, "the timing cache's folder", "--timing-cache", "--timing-cache path")


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    try:
        # From a corrupt or foreign file TensorRT gives no cache (None) or raises; polygraphy guards both too.
        cache = config.create_timing_cache(data)
    except (RuntimeError, TypeError, ValueError):
        cache = None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError("TensorRT rejected the timing cache", path=path,
                          fix="delete it; it is corrupt, or was written by another TensorRT version or GPU")
    return cache


def build_engine(onnx_path: str | Path, output: str | Path, options: BuildOptions | None = None,
                 *, check: bool = False, reference_onnx: str | Path | None = None,
                 samples: Sequence[np.ndarray] = ()) -> Path:
    """Build a serialized TensorRT engine from an ONNX file written by :mod:`export.onnx`.

    Args:
        onnx_path: the ``.onnx`` file; its sidecar must be beside it.
        output: the ``.engine`` path to write (atomically), with its sidecar.
        options: build settings (default :class:`BuildOptions`).
        check: compare the engine with onnxruntime before writing it (see :func:`check_engine`).
        reference_onnx: the ONNX that ``check`` runs in onnxruntime (default ``onnx_path``).
        samples: images for ``check`` (see :func:`check_engine`).

    Returns:
        The engine path. Its inputs and outputs are those of the ONNX file (fp32).

    Raises:
        ImportError: tensorrt is not installed (names the pip extra). ConfigError: bad options, or an ``output``
        not named ``.engine``/``.plan``. EngineError: parse, build or check failure. OutputError: ``output`` or the
        timing cache would overwrite the ONNX file or its sidecar, the output folder does not exist, or the timing
        cache is a folder or its folder does not exist. With ``check``, a missing ``reference_onnx`` (EngineError) or
        polygraphy or onnxruntime (ImportError). All of these are raised before the build.
    """
    options = options or BuildOptions()
    options.validate()
    check_output(output, "tensorrt", onnx_path, reference_onnx)
    onnx_path, output = Path(onnx_path), Path(output)
    if options.timing_cache is not None:
        refuse_overwriting_inputs(options.timing_cache, onnx_path, reference_onnx)
        if Path(options.timing_cache).resolve() in (output.resolve(), sidecar_path(output).resolve()):
            raise ConfigError("the timing cache would be overwritten by the engine or its sidecar",
                              path=options.timing_cache, fix="give --timing-cache its own file, e.g. trt.cache")
        _check_timing_cache_path(Path(options.timing_cache))
    if check:  # what the check needs, known before the build rather than after it (the engine is then lost)
        if reference_onnx is not None and not Path(reference_onnx).is_file():
            raise EngineError("is not a file" if Path(reference_onnx).exists() else "does not exist",
                              path=reference_onnx, fix="pass --reference-onnx an .onnx file written by python -m "
                                                       "export.onnx")
        require("polygraphy", "comparing TensorRT with onnxruntime")
        require("onnxruntime", "comparing TensorRT with onnxruntime")
    trt_module = _tensorrt()
    import tensorrt as trt

    meta = _engine_sidecar(onnx_path, options)
    major = _major(trt_module)
    strongly_typed = meta.precision == "fp16" or major >= 11
    if options.fp16 and meta.precision == "fp32" and major >= 11:
        raise ConfigError(f"TensorRT {trt.__version__} builds strongly typed networks only, so an fp32 ONNX cannot "
                          "become an fp16 engine", path=onnx_path,
                          fix="export the ONNX with python -m export.onnx --precision fp16")

    logger = trt.Logger(trt.Logger.WARNING)
    if not trt.init_libnvinfer_plugins(logger, ""):
        raise EngineError("TensorRT's plugin library (needed for DeformConv) failed to initialise",
                          fix="check the TensorRT installation (libnvinfer_plugin)")
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed and major < 11 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    graph, fp32_nodes = _onnx_bytes(onnx_path, meta, options)
    if not parser.parse(graph, str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT {trt.__version__} could not parse the ONNX graph: {errors}", path=onnx_path,
                          fix="re-export it with python -m export.onnx and use TensorRT >= 10.1 (DeformConv)")

    config = builder.create_builder_config()
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if not options.tf32:
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned = 0
    if options.fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32_islands(network, fp32_nodes, options.dcn_fp16)
    plugin_libraries: list[str] = []
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        plugin_libraries = parser.get_used_vc_plugin_libraries()
        config.plugins_to_serialize = plugin_libraries
    profile = builder.create_optimization_profile()
    shapes = _profile_shapes(network, meta, options)
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, trt.Dims(low), trt.Dims(opt), trt.Dims(high))
    config.add_optimization_profile(profile)
    _load_timing_cache(config, options.timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT {trt.__version__} failed to build the engine (see its log above)",
                          path=onnx_path, fix="try a smaller --max-batch or a larger --workspace")
    engine_bytes = bytes(serialized)
    if options.timing_cache is not None:
        atomic_write_bytes(options.timing_cache, bytes(config.get_timing_cache().serialize()))

    fp16_engine = meta.precision == "fp16" or options.fp16
    extra = {key: value for key, value in meta.extra.items() if key != "check"}
    extra.update({"source_onnx": onnx_path.name, "profile": {k: list(v) for k, v in shapes.items()},
                  "strongly_typed": strongly_typed, "dcn_precision": "fp16" if options.dcn_fp16 and fp16_engine
                  else "fp32", "tf32": options.tf32, "layers_pinned_fp32": pinned,
                  "version_compatible": options.version_compatible, "serialized_plugin_libraries": plugin_libraries})
    engine_meta = dataclasses.replace(
        meta, precision="fp16" if fp16_engine else "fp32",
        built_with={**meta.built_with, "tensorrt": trt.__version__, **metadata.gpu_info()}, extra=extra)
    if check:
        # Checked before anything is written, so a failing engine never lands at ``output``.
        results = _compare(engine_bytes, engine_meta, Path(reference_onnx or onnx_path), None, samples, output)
        extra["check"] = {name: result.to_dict() for name, result in results.items()}
    atomic_write_bytes(output, engine_bytes)
    write_sidecar(output, engine_meta)
    return output


def _check_feeds(meta: EngineMeta, batch: int, size: int, samples: Sequence[np.ndarray]) -> dict[str, dict]:
    """Named input feeds for the check: uniform random inputs and the sample batch."""
    rng = np.random.default_rng(0)
    random_feed = {"input": rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)}
    # repeated up to the batch, which the profile may require (a fixed batch, or --min-batch above the samples)
    sample = np.stack([samples[i % len(samples)] for i in range(batch)]) if len(samples) else None
    if sample is None:
        from export.source import ExportSpec, check_inputs

        spec = ExportSpec(batch, size, size, False, meta.takes_fidelity)
        sample = check_inputs(spec, batch)[0].numpy()
    feeds = {"random": random_feed, "sample": {"input": sample.astype(np.float32)}}
    if meta.takes_fidelity:
        feeds["random"]["fidelity"] = rng.uniform(0, 1, (batch,)).astype(np.float32)
        feeds["sample"]["fidelity"] = np.linspace(0, 1, len(sample), dtype=np.float32)
    return feeds


def check_engine(engine_path: str | Path, reference_onnx: str | Path, *, batch: int | None = None,
                 samples: Sequence[np.ndarray] = ()) -> dict[str, Agreement]:
    """Run an engine and onnxruntime (CUDA if available, else CPU) on the same inputs through polygraphy.

    Args:
        engine_path: the engine (with its sidecar).
        reference_onnx: the ONNX graph onnxruntime runs (the fp32 export gives the total error of an fp16 engine).
        batch: the batch to test (default: the profile's opt batch).
        samples: [3, H, W] float32 images in [-1, 1] (e.g. aligned faces); default a deterministic synthetic batch.

    Returns:
        {"random": Agreement, "sample": Agreement}; each is also printed.

    Raises:
        EngineError: fp16 below :data:`FP16_MIN_PSNR` dB, or fp32 above :data:`FP32_MAX_ABS` max abs error.
    """
    engine_path = Path(engine_path)
    return _compare(engine_path.read_bytes(), read_sidecar(engine_path), Path(reference_onnx), batch, samples,
                    engine_path)


def _compare(engine: bytes, meta: EngineMeta, reference_onnx: Path, batch: int | None,
             samples: Sequence[np.ndarray], engine_path: Path) -> dict[str, Agreement]:
    """:func:`check_engine` on serialized engine bytes and their sidecar fields."""
    require("polygraphy", "comparing TensorRT with onnxruntime")
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    profile = meta.extra.get("profile", {}).get("input")
    opt_shape = profile[1] if profile else [1, 3, meta.face_size, meta.face_size]
    feeds = _check_feeds(meta, batch or opt_shape[0], opt_shape[2], samples)
    ort = require("onnxruntime", "comparing TensorRT with onnxruntime")
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    runners = [TrtRunner(EngineFromBytes(engine)),
               OnnxrtRunner(SessionFromOnnx(str(reference_onnx), providers=providers))]
    results = Comparator.run(runners, data_loader=list(feeds.values()))
    trt_outputs, ort_outputs = (results[runner.name] for runner in runners)
    found = {name: agreement(trt_outputs[i]["output"], ort_outputs[i]["output"]) for i, name in enumerate(feeds)}
    for name, result in found.items():
        print(f"TensorRT vs onnxruntime ({', '.join(providers)}) on {name} inputs: {result}")
    for i, (name, result) in enumerate(found.items()):
        tolerance = FP32_MAX_ABS * max(1.0, float(np.abs(ort_outputs[i]["output"]).max()))
        if meta.precision == "fp16" and not result.psnr_db >= FP16_MIN_PSNR:
            raise EngineError(f"fp16 engine too far from onnxruntime on {name} inputs: {result} (needs >= "
                              f"{FP16_MIN_PSNR} dB)", path=engine_path, fix="build without --dcn-fp16, or in fp32")
        if meta.precision == "fp32" and not result.max_abs <= tolerance:
            raise EngineError(f"fp32 engine differs from onnxruntime on {name} inputs: {result} (tolerance "
                              f"{tolerance:.3g})", path=engine_path, fix="build without --tf32")
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__.split("\n\n")[0])
    parser.add_argument("onnx", type=Path, help="an ONNX file written by python -m export.onnx (with its .json)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .engine (or .plan) file to write")
    parser.add_argument("--fp16", action="store_true",
                        help="fp16 kernels for an fp32 ONNX (TensorRT 10); an fp16 ONNX is fp16 anyway")
    parser.add_argument("--min-batch", type=int, default=1, help="smallest batch of the profile (default: 1)")
    parser.add_argument("--opt-batch", type=int, default=1, help="batch TensorRT tunes for (default: 1)")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch of the profile (default: 8)")
    parser.add_argument("--size", type=int, help="H and W for a v1 ONNX with dynamic size (default: face size)")
    parser.add_argument("--timing-cache", type=Path, help="load (if present) and save the timing cache here")
    parser.add_argument("--workspace", type=float, metavar="GB", help="builder workspace limit in GiB")
    parser.add_argument("--version-compatible", action="store_true",
                        help="an engine later TensorRT versions can run (plugin library serialised into it)")
    parser.add_argument("--dcn-fp16", action="store_true",
                        help="run DeformConv in fp16 (the plugin then rounds sampling coordinates to fp16)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 layers")
    parser.add_argument("--check", action="store_true", help="compare with onnxruntime on random and sample inputs")
    parser.add_argument("--reference-onnx", type=Path,
                        help="the ONNX graph --check runs in onnxruntime (default: the input ONNX)")
    parser.add_argument("--samples", type=Path, nargs="+", default=[],
                        help="aligned face images for --check (default: a synthetic batch)")
    return parser


def load_samples(paths: Sequence[Path], size: int) -> list[np.ndarray]:
    """Aligned face images -> [3, size, size] float32 arrays in [-1, 1] (resized if needed, like the demo)."""
    import cv2

    from vqfr.imaging import load_image, to_tensor

    faces = []
    for path in paths:
        img = load_image(path)
        if img.shape[:2] != (size, size):
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        faces.append(to_tensor(img)[0].numpy())
    return faces


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.check and (args.samples or args.reference_onnx):  # silently unused, the build would look checked
        parser.error("--samples and --reference-onnx are only used by --check; add --check")
    options = BuildOptions(fp16=args.fp16, min_batch=args.min_batch, opt_batch=args.opt_batch,
                           max_batch=args.max_batch, size=args.size, timing_cache=args.timing_cache,
                           workspace_gb=args.workspace, version_compatible=args.version_compatible,
                           dcn_fp16=args.dcn_fp16, tf32=args.tf32)

    def build() -> str:
        check_output(args.output, "tensorrt", *args.samples)  # the samples are inputs too; build_engine has arrays
        if args.samples:  # before its sidecar is read for the face size
            _check_onnx_file(args.onnx)
        samples = load_samples(args.samples, args.size or read_sidecar(args.onnx).face_size) if args.samples else []
        return "wrote " + str(build_engine(args.onnx, args.output, options, check=args.check,
                                           reference_onnx=args.reference_onnx, samples=samples))

    return run_command(build)


if __name__ == "__main__":
    from vqfr.errors import exit_status

    raise SystemExit(exit_status(main))
