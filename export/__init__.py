"""promptcore.export: frozen prompts to ONNX, verified in onnxruntime, and serving layouts."""

from .graphs import ExportError, build_graph
from .onnx_export import ExportReport, read_metadata, to_onnx

__all__ = ["ExportError", "ExportReport", "build_graph", "read_metadata", "to_onnx"]
