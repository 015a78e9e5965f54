"""ONNX export of the gate and RPN branches, and the onnxruntime router that serves them.

``export_onnx`` / ``export_checkpoint`` write ``gate.onnx`` and ``rpn.onnx`` (+ fp16 variants, config and a
parity report); ``OnnxRouter`` runs them inside ``zoom_generate`` (``router=OnnxRouter(dir)``), and
``router_from_env`` picks it in ms-swift from ``QZOOM_ROUTER=onnx`` + ``QZOOM_ONNX_DIR``. Names are imported
lazily: onnx, onnxscript and onnxruntime load only when an export or a router is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "export_onnx": "qzoom_swift.onnx.export",
    "export_checkpoint": "qzoom_swift.onnx.export",
    "export_branch": "qzoom_swift.onnx.export",
    "parity_report": "qzoom_swift.onnx.export",
    "read_metadata": "qzoom_swift.onnx.export",
    "router_inputs": "qzoom_swift.onnx.export",
    "torch_reference": "qzoom_swift.onnx.export",
    "onnx_filename": "qzoom_swift.onnx.export",
    "ExportResult": "qzoom_swift.onnx.export",
    "OnnxExportError": "qzoom_swift.onnx.export",
    "OnnxRouter": "qzoom_swift.onnx.router",
    "OnnxRouterError": "qzoom_swift.onnx.router",
    "router_from_env": "qzoom_swift.onnx.router",
    "GateGraph": "qzoom_swift.onnx.graphs",
    "RPNGraph": "qzoom_swift.onnx.graphs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qzoom_swift.onnx' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
