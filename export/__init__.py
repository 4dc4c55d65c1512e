"""Export VQFR to deployable engines; every engine gets a sidecar JSON (:mod:`vqfr.sidecar`).

- ONNX: ``python -m export.onnx`` / :func:`export.onnx.export_onnx` -> ``.onnx`` (fp32, or fp16 with fp32 islands).
- TensorRT: ``python -m export.trt`` / :func:`export.trt.build_engine` -> ``.engine``, built from the ONNX file.
- AOTInductor: ``python -m export.aoti`` / :func:`export.aoti.export_aoti` -> ``.pt2``.

Importing this package imports none of onnx, onnxruntime or tensorrt; each exporter loads what it needs.
See docs/EXPORT.md.
"""
