"""Serving layouts built on an exported model: a Triton Inference Server model repository.

Layout: ``<root>/<name>/config.pbtxt``, ``<root>/<name>/labels.txt`` and
``<root>/<name>/1/model.onnx``. The config is built as Triton's own ``inference.ModelConfig``
protobuf message (``tritonclient.grpc.model_config_pb2``), written in protobuf text format, parsed
back with ``google.protobuf.text_format`` against the same schema, and its inputs and outputs
(names, data types, dims) are compared with the ONNX graph before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List, Sequence, Tuple

from .graphs import check_classnames

# ONNX TensorProto element types -> Triton DataType enum names
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32",
                  7: "TYPE_INT64", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}


class ServingConfigError(ValueError):
    """A Triton model config that does not follow Triton's schema or does not match its ONNX graph."""


def model_config_schema():
    """Triton's ``ModelConfig`` protobuf module (from ``tritonclient[grpc]``), or a clear error."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ServingConfigError("checking a Triton config needs Triton's ModelConfig schema from tritonclient: "
                                 "pip install 'promptcore[serve]' (or 'tritonclient[grpc]')") from exc
    return model_config_pb2


def onnx_io(model) -> Tuple[List[Tuple[str, str, List[int]]], List[Tuple[str, str, List[int]]]]:
    """(name, Triton data type, dims without the batch axis) of an ONNX graph's inputs and outputs."""
    def entries(values):
        out = []
        for v in values:
            tensor = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            if tensor.elem_type not in ONNX_TO_TRITON:
                raise ServingConfigError(f"ONNX tensor {v.name!r} has element type {tensor.elem_type}, which Triton "
                                         "cannot serve")
            out.append((v.name, ONNX_TO_TRITON[tensor.elem_type], dims[1:]))  # the batch axis is Triton's
        return out

    return entries(model.graph.input), entries(model.graph.output)


def build_config(name: str, inputs, outputs, max_batch_size: int, preferred: Sequence[int],
                 label_output: str = "logits", max_queue_delay_us: int = 100):
    """Triton's ``ModelConfig`` message for an onnxruntime model with dynamic batching."""
    pb = model_config_schema()
    config = pb.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=int(max_batch_size))
    for tensor_name, data_type, dims in inputs:
        config.input.add(name=tensor_name, data_type=pb.DataType.Value(data_type), dims=list(dims))
    for tensor_name, data_type, dims in outputs:
        entry = config.output.add(name=tensor_name, data_type=pb.DataType.Value(data_type), dims=list(dims))
        if tensor_name == label_output:
            entry.label_filename = "labels.txt"
    config.dynamic_batching.preferred_batch_size.extend(int(b) for b in preferred)
    config.dynamic_batching.max_queue_delay_microseconds = int(max_queue_delay_us)
    return config


def render_config(config) -> str:
    """The config.pbtxt text (protobuf text format) of a ``ModelConfig`` message."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's schema; an unknown field or a wrongly typed value raises
    :class:`ServingConfigError` naming it (protobuf's message gives the line, column and field)."""
    from google.protobuf import text_format

    pb = model_config_schema()
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        raise ServingConfigError(f"config.pbtxt does not follow Triton's ModelConfig schema: {exc}") from exc


def check_config(config, model) -> None:
    """Compare a ``ModelConfig`` with its ONNX graph: platform, batching, and every input and output's
    name, data type and dims; raise :class:`ServingConfigError` naming the first difference."""
    pb = model_config_schema()
    if config.platform != "onnxruntime_onnx" and config.backend != "onnxruntime":
        raise ServingConfigError(f"config.pbtxt platform {config.platform!r} is not onnxruntime_onnx")
    if config.max_batch_size < 1:
        raise ServingConfigError(f"config.pbtxt max_batch_size is {config.max_batch_size}: the ONNX graph has a "
                                 "dynamic batch axis, so max_batch_size must be >= 1")
    bad = [b for b in config.dynamic_batching.preferred_batch_size if not 1 <= b <= config.max_batch_size]
    if bad:
        raise ServingConfigError(f"config.pbtxt dynamic_batching.preferred_batch_size {bad[0]} is outside "
                                 f"1..max_batch_size ({config.max_batch_size})")
    graph_inputs, graph_outputs = onnx_io(model)
    for kind, entries, graph in (("input", config.input, graph_inputs), ("output", config.output, graph_outputs)):
        written = [(e.name, pb.DataType.Name(e.data_type), list(e.dims)) for e in entries]
        if [w[0] for w in written] != [g[0] for g in graph]:
            raise ServingConfigError(f"config.pbtxt {kind} names {[w[0] for w in written]} differ from the ONNX "
                                     f"graph's {[g[0] for g in graph]}")
        for (tensor, dtype, dims), (_, graph_dtype, graph_dims) in zip(written, graph):
            if dtype != graph_dtype:
                raise ServingConfigError(f"config.pbtxt {kind} {tensor!r} field data_type is {dtype}, the ONNX "
                                         f"graph's is {graph_dtype}")
            if dims != graph_dims:
                raise ServingConfigError(f"config.pbtxt {kind} {tensor!r} field dims is {dims}, the ONNX graph's "
                                         f"is {graph_dims} (without the batch axis)")


def write_triton_repository(root, onnx_path, name: str, classnames: Sequence[str], max_batch_size: int = 64,
                            preferred: Sequence[int] = (8, 16, 32)) -> Path:
    """Write a Triton model repository for ``onnx_path`` under ``root``, checked against Triton's schema
    and the ONNX graph before any file is written."""
    import onnx

    check_classnames(classnames)  # a control character in a name would shift every label after it in labels.txt
    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs, outputs = onnx_io(model)
    config = build_config(name, inputs, outputs, max_batch_size, [b for b in preferred if b <= max_batch_size])
    text = render_config(config)
    parsed = parse_config(text)
    if parsed != config:
        raise ServingConfigError("config.pbtxt does not read back as written")
    check_config(parsed, model)
    folder = Path(root) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text)
    (folder / "labels.txt").write_text("\n".join(classnames) + "\n")
    src = Path(onnx_path)
    shutil.copy2(src, folder / "1" / "model.onnx")
    external = src.with_name(src.name + ".data")  # the graph refers to its external data by this name
    if external.exists():
        shutil.copy2(external, folder / "1" / external.name)
    return folder


def check_repository(folder) -> None:
    """Check a written model folder: its config.pbtxt against Triton's schema and its ONNX graph."""
    import onnx

    folder = Path(folder)
    config = parse_config((folder / "config.pbtxt").read_text())
    check_config(config, onnx.load(str(folder / "1" / "model.onnx"), load_external_data=False))
