"""TensorRT backend for serialized engines (``.engine`` / ``.plan``) built by ``export/trt.py``.

A serialized engine only runs on the TensorRT version and the GPU (compute capability) it was built for, unless it
was built version- or hardware-compatible. :meth:`TensorRTBackend.check` reads the sidecar's ``built_with`` and says
which of the two differs, before TensorRT gets the chance to fail obscurely. Every VQFR engine holds the DeformConv
plugin, so :meth:`TensorRTBackend.load` registers libnvinfer_plugin before deserializing. Tensors stay on the GPU:
inputs and the output are torch CUDA tensors whose addresses are bound to the execution context.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vqfr._optional import require
from vqfr.backends.base import Backend, BackendEntry, cuda_missing, missing_package, pad_batch, reasons
from vqfr.errors import BackendUnavailable, EngineError
from vqfr.sidecar import EngineMeta

__all__ = ["TensorRTBackend", "compatibility_problem"]


def compatibility_problem(meta: EngineMeta | None, trt_version: str, capability: tuple[int, int],
                          gpu_name: str = "") -> str | None:
    """Why an engine described by ``meta`` cannot run with this TensorRT and GPU, or None.

    Args:
        meta: the sidecar (``built_with.tensorrt``, ``built_with.compute_capability``; ``extra.version_compatible``
            and ``extra.hardware_compatibility`` relax the checks when the exporter set those builder flags).
        trt_version: the installed TensorRT version, e.g. ``"10.8.0.43"``.
        capability: this GPU's compute capability, e.g. (9, 0).
        gpu_name: this GPU's name (for the message).
    """
    if meta is None:
        return "no sidecar: cannot tell which TensorRT and GPU the engine was built for"
    built = meta.built_with
    built_trt = str(built.get("tensorrt") or "")
    if not built_trt:
        return "the sidecar does not record the TensorRT version the engine was built with"
    same_version = built_trt.split(".")[:3] == trt_version.split(".")[:3]
    # A version-compatible plan runs on the TensorRT that built it and on later ones (of later major versions
    # too), never on an earlier one (TensorRT developer guide, "Version Compatibility").
    if not same_version and not (meta.extra.get("version_compatible") and _release(trt_version) >=
                                 _release(built_trt)):
        return f"engine built with TensorRT {built_trt}, this is TensorRT {trt_version}; rebuild it here"
    cc = str(built.get("compute_capability") or "")
    here = f"{capability[0]}.{capability[1]}"
    if cc and cc != here and not meta.extra.get("hardware_compatibility"):
        return (f"engine built for compute capability {cc} ({built.get('gpu', 'unknown GPU')}), this GPU is {here} "
                f"({gpu_name}); rebuild it on this GPU")
    return None


def _release(version: str) -> tuple[int, ...]:
    """``"10.8.0.43"`` -> (10, 8, 0): major, minor and patch, for ordering TensorRT versions."""
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


class TensorRTBackend(Backend):
    """Runs a serialized TensorRT engine on the current CUDA device."""

    @classmethod
    def check(cls, entry: BackendEntry, meta: EngineMeta | None) -> tuple[str | None, str]:
        reason = reasons(missing_package("tensorrt", "trt"), cuda_missing())
        if reason:
            return reason, ""
        import tensorrt as trt

        return None, f"TensorRT {trt.__version__}, {torch.cuda.get_device_name()}"

    @classmethod
    def engine_problem(cls, entry: BackendEntry, meta: EngineMeta | None) -> str | None:
        if meta is None:
            return None
        import tensorrt as trt

        return compatibility_problem(meta, trt.__version__, torch.cuda.get_device_capability(),
                                     torch.cuda.get_device_name())

    def load(self) -> None:
        trt = require("tensorrt", "running TensorRT engines")
        path = Path(self.engine)
        problem = compatibility_problem(self.meta, trt.__version__, torch.cuda.get_device_capability(self.device),
                                        torch.cuda.get_device_name(self.device))
        if problem:
            raise EngineError(problem, path=path, fix="rebuild the engine here with python -m export.trt")
        if self.requested_precision not in ("auto", self.precision):
            raise EngineError(f"was built in {self.precision}; precision {self.requested_precision} was asked",
                              path=path, fix="use auto, or rebuild it in that precision: an engine has its ONNX's "
                                             "(python -m export.onnx --precision fp32|fp16), or fp16 from an fp32 "
                                             "ONNX with python -m export.trt --fp16 (TensorRT 10)")
        self._logger = trt.Logger(trt.Logger.WARNING)
        # Every VQFR engine holds the DeformConv plugin (ModulatedDeformConv2d, from libnvinfer_plugin); TensorRT
        # cannot deserialize it unless the plugin's creator is registered in this process.
        if not trt.init_libnvinfer_plugins(self._logger, ""):
            raise BackendUnavailable("TensorRT's plugin library (libnvinfer_plugin, needed for DeformConv) failed to "
                                     "initialise", path=path, fix="check the TensorRT installation")
        self._runtime = trt.Runtime(self._logger)
        if self.meta is not None and self.meta.extra.get("version_compatible"):
            # A version-compatible plan embeds the lean runtime (host code), which TensorRT refuses to load unless
            # the runtime allows it (IRuntime::setEngineHostCodeAllowed).
            self._runtime.engine_host_code_allowed = True
        with torch.cuda.device(self.device):
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise EngineError("TensorRT could not deserialize the engine (truncated, corrupt, or built for "
                                  "another TensorRT version or GPU)", path=path,
                                  fix="rebuild it here with python -m export.trt")
            self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        expected = self.meta.input_names if self.meta else self._inputs
        if sorted(self._inputs) != sorted(expected):
            raise EngineError(f"engine inputs {self._inputs} differ from its sidecar's {expected}", path=path,
                              fix="keep each engine with the sidecar written beside it")
        self._dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        low, _, high = self._engine.get_tensor_profile_shape(self._inputs[0], 0)
        self._min_batch, self._max_batch = int(low[0]), int(high[0])
        self.loaded = True

    @property
    def max_batch(self) -> int | None:
        return self._max_batch if self.loaded else None

    def infer(self, x: Tensor, fidelity: Tensor) -> Tensor:
        n = x.shape[0]
        x, fidelity = pad_batch(x, fidelity.reshape(-1), self._min_batch)
        feeds = {"input": x, "fidelity": fidelity}
        keep = []
        for name in self._inputs:
            t = feeds[name].detach().to(self.device, self._dtypes[name]).contiguous()
            keep.append(t)
            if not self._context.set_input_shape(name, tuple(t.shape)):
                raise EngineError(f"the engine does not take {name} of shape {list(t.shape)} (its profile covers "
                                  f"batches {self._min_batch} to {self._max_batch})", path=self.engine,
                                  fix=f"pass at most {self._max_batch} faces of the size in its sidecar, or rebuild "
                                      "it with python -m export.trt --max-batch N")
            self._context.set_tensor_address(name, t.data_ptr())
        out_name = self._outputs[0]
        out = torch.empty(tuple(self._context.get_tensor_shape(out_name)), device=self.device,
                          dtype=self._dtypes[out_name])
        self._context.set_tensor_address(out_name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise EngineError("TensorRT execution failed", path=self.engine, fix="run with --debug for the log")
        return out[:n]

    def close(self) -> None:
        self._context = self._engine = self._runtime = None
        super().close()


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]
