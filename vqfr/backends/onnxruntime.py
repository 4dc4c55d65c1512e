"""ONNX Runtime backend for ``.onnx`` engines written by ``export/onnx.py`` (inputs ``input`` [B,3,S,S] and, for v2,
``fidelity`` [B]; output ``output``; the sidecar ``model.onnx.json`` gives names, face size and precision).

One class serves three table rows, one per execution provider: TensorRT EP, CUDA EP, CPU. On CUDA providers the
tensors stay on the GPU (I/O binding to torch tensors); on the CPU they pass as numpy arrays. The TensorRT EP's engine
cache is ``<model>.onnx.trt_cache/<sha>/`` (or ``$VQFR_TRT_CACHE/<sha>/``), ``<sha>`` the first 16 hex digits of the
file's sha256, so an ONNX re-exported over the same path never runs the old weights' engine.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vqfr._optional import require
from vqfr.backends.base import Backend, BackendEntry, cuda_missing, missing_package, pad_batch, reasons
from vqfr.checkpoint import file_sha256
from vqfr.errors import BackendUnavailable, EngineError
from vqfr.sidecar import EngineMeta

__all__ = ["OnnxRuntimeBackend", "ort_errors"]

_NP = {"float32": np.float32, "float16": np.float16}
_TORCH = {"float32": torch.float32, "float16": torch.float16}


def ort_errors(ort) -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises (pybind classes that derive from Exception directly)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return (RuntimeError, ValueError, *(getattr(state, n) for n in names if hasattr(state, n)))


class OnnxRuntimeBackend(Backend):
    """Runs an ONNX engine with the row's execution provider."""

    @classmethod
    def check(cls, entry: BackendEntry, meta: EngineMeta | None) -> tuple[str | None, str]:
        extra = "gpu" if entry.device == "cuda" else "onnx"
        reason = missing_package("onnxruntime", extra)
        if reason:
            return reasons(reason, cuda_missing() if entry.device == "cuda" else None), ""
        import onnxruntime as ort

        found: list[str | None] = []
        if entry.provider not in ort.get_available_providers():
            hint = "pip install 'vqfr-deploy[gpu]' (onnxruntime-gpu)" if entry.device == "cuda" else "reinstall it"
            found.append(f"onnxruntime {ort.__version__} has no {entry.provider} (it has "
                         f"{', '.join(ort.get_available_providers())}); {hint}")
        if entry.provider == "TensorrtExecutionProvider":
            trt = missing_package("tensorrt", "trt")
            found.append(trt and f"the TensorRT EP needs TensorRT: {trt}")
        if entry.device == "cuda":
            found.append(cuda_missing())
        return reasons(*found), f"onnxruntime {ort.__version__}"

    def load(self) -> None:
        ort = require("onnxruntime", "running .onnx engines")
        path = Path(self.engine)
        if self.requested_precision not in ("auto", self.precision) and not (
                self.entry.provider == "TensorrtExecutionProvider" and self.requested_precision == "fp16"):
            raise EngineError(f"was exported in {self.precision}; precision {self.requested_precision} was asked",
                              path=path, fix=f"re-export with --precision {self.requested_precision} or use auto")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self._errors = ort_errors(ort)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=self._providers(path))
        except ort_errors(ort) as exc:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if any(s in text for s in ("EP", "CUDA", "TensorRT", "cudnn", "libnv")):
                raise BackendUnavailable(f"{self.entry.label} failed to start ({text})", path=path,
                                         fix="check the CUDA/TensorRT installation or pick --backend torch") from exc
            raise EngineError(f"is not a loadable ONNX model ({text})", path=path,
                              fix="re-export it with python -m export.onnx") from exc
        if self.session.get_providers()[0] != self.entry.provider:
            raise BackendUnavailable(f"{self.entry.provider} did not initialise (running on "
                                     f"{self.session.get_providers()[0]})", path=path,
                                     fix="check the CUDA/TensorRT installation")
        names = [i.name for i in self.session.get_inputs()]
        expected = self.meta.input_names if self.meta else names
        if sorted(names) != sorted(expected):
            raise EngineError(f"graph inputs {names} differ from its sidecar's {expected}", path=path,
                              fix="keep each engine with the sidecar written beside it")
        if self.meta is not None and (wrong := _shape_mismatch(self.session.get_inputs(), self.meta)):
            raise EngineError(f"{wrong}: the sidecar does not describe this graph (edited, or another engine's)",
                              path=path, fix="keep each engine with the sidecar written beside it, or re-export it")
        self.input_names = expected
        self.output_name = self.meta.outputs[0].name if self.meta else self.session.get_outputs()[0].name
        # The images' and the output's element types, by name (the graph may list fidelity first).
        self.in_dtype = _element_type(next(i for i in self.session.get_inputs() if i.name != "fidelity"))
        self.out_dtype = _element_type(next((o for o in self.session.get_outputs() if o.name == self.output_name),
                                            self.session.get_outputs()[0]))
        self.loaded = True

    def _providers(self, path: Path) -> list:
        index = self.device.index or 0
        cpu = "CPUExecutionProvider"
        cuda = ("CUDAExecutionProvider", {"device_id": index})
        if self.entry.provider == cpu:
            return [cpu]
        if self.entry.provider == "CUDAExecutionProvider":
            return [cuda, cpu]
        # The TensorRT EP names cached engines after the model's path, not its weights: key the folder by the file's
        # content, or an ONNX re-exported over the same path would run the engine built from the old weights.
        digest = self.meta.file_sha256 if self.meta is not None and self.meta.file_sha256 else file_sha256(path)
        root = Path(os.environ.get("VQFR_TRT_CACHE", path.with_name(path.name + ".trt_cache")))
        cache = root / digest[:16]
        trt = {"device_id": index, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
               "trt_fp16_enable": self.precision == "fp16" or self.requested_precision == "fp16"}
        return [("TensorrtExecutionProvider", trt), cuda, cpu]

    def infer(self, x: Tensor, fidelity: Tensor) -> Tensor:
        n = x.shape[0]
        x, fidelity = pad_batch(x, fidelity.reshape(-1), self.fixed_batch or 1)
        feeds = {self.input_names[0]: x}
        if "fidelity" in self.input_names:
            feeds["fidelity"] = fidelity
        if self.entry.device == "cuda":
            return self._infer_bound(feeds, x.shape)[:n]
        arrays = {k: np.ascontiguousarray(v.detach().cpu().numpy().astype(_NP[self.in_dtype] if k != "fidelity"
                                                                          else np.float32))
                  for k, v in feeds.items()}
        try:
            (out,) = self.session.run([self.output_name], arrays)
        except self._errors as exc:
            raise EngineError(f"onnxruntime failed on a batch of {x.shape[0]} ({str(exc).strip().splitlines()[0]})",
                              path=self.engine,
                              fix="check that the engine matches its sidecar, or re-export it") from exc
        return torch.from_numpy(out)[:n]

    def _infer_bound(self, feeds: dict[str, Tensor], shape: torch.Size) -> Tensor:
        """GPU path: bind torch CUDA tensors to the session's inputs and output (no host copies)."""
        index = self.device.index or 0
        binding = self.session.io_binding()
        keep = []
        for name, t in feeds.items():
            dtype = "float32" if name == "fidelity" else self.in_dtype
            t = t.detach().to(self.device, _TORCH[dtype]).contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", index, _NP[dtype], tuple(t.shape), t.data_ptr())
        out = torch.empty(tuple(shape), device=self.device, dtype=_TORCH[self.out_dtype])
        binding.bind_output(self.output_name, "cuda", index, _NP[self.out_dtype], tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()
        try:
            self.session.run_with_iobinding(binding)
        except self._errors as exc:
            raise EngineError(f"onnxruntime failed on a batch of {shape[0]} ({str(exc).strip().splitlines()[0]})",
                              path=self.engine,
                              fix="check that the engine matches its sidecar, or re-export it") from exc
        return out

    def close(self) -> None:
        self.session = None
        super().close()


def _element_type(arg: Any) -> str:
    """``float32`` or ``float16``: the element type of a session input or output (``tensor(float16)`` ...)."""
    return {"float": "float32", "float16": "float16"}.get(arg.type.removeprefix("tensor(").removesuffix(")"), "float32")


def _shape_mismatch(graph_inputs: list, meta: EngineMeta) -> str | None:
    """How the graph's input shapes differ from the sidecar's (-1 there, a named or unknown dimension in the graph:
    dynamic), or None. The runtime takes the face size and the batch from the sidecar, so they must be the graph's."""
    declared = {t.name: t.shape for t in meta.inputs}
    for node in graph_inputs:
        graph = tuple(d if isinstance(d, int) else -1 for d in node.shape)
        side = declared.get(node.name)
        if side is not None and (len(graph) != len(side) or any(g != s for g, s in zip(graph, side, strict=True))):
            return f"graph input {node.name!r} has shape {list(graph)}, its sidecar says {list(side)}"
    return None


def provider_note() -> str:
    """Which providers this onnxruntime offers (for reports)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime not installed"
    import onnxruntime as ort

    return ", ".join(ort.get_available_providers())
