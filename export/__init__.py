"""Export VQFR to deployable engines; every engine gets a sidecar JSON (:mod:`vqfr.sidecar`).

=========  ======================  =====================================================  ===========
format     command                 function                                               file
=========  ======================  =====================================================  ===========
ONNX       ``python -m export.onnx``  :func:`export.onnx.export_onnx`                     ``.onnx``
TensorRT   ``python -m export.trt``   :func:`export.trt.build_engine` (from the ONNX file)  ``.engine``
AOTI       ``python -m export.aoti``  :func:`export.aoti.export_aoti`                     ``.pt2``
=========  ======================  =====================================================  ===========

Importing this package imports none of onnx, onnxruntime, tensorrt or the exporters; each module loads what it needs.
See docs/EXPORT.md.
"""
