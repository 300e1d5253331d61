"""Serving layouts built on an exported model: a Triton Inference Server model repository.

Layout: ``<root>/<name>/config.pbtxt``, ``<root>/<name>/labels.txt`` and
``<root>/<name>/1/model.onnx``. The config is checked by parsing it back
(:func:`parse_pbtxt`, a reader for the protobuf text-format subset Triton configs use) and
comparing names, types and dims with the ONNX graph.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32",
                  16: "TYPE_BF16"}


def _io_entries(values) -> List[Dict[str, object]]:
    entries = []
    for v in values:
        tensor = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        entries.append({"name": v.name, "data_type": ONNX_TO_TRITON.get(tensor.elem_type, "TYPE_INVALID"),
                        "dims": dims[1:]})  # the batch axis is Triton's, not part of dims
    return entries


def render_config(name: str, inputs, outputs, max_batch_size: int, preferred: Sequence[int],
                  label_output: str = "logits") -> str:
    """The config.pbtxt text of an onnxruntime model with dynamic batching."""
    def block(entries, labels):
        parts = []
        for e in entries:
            lines = [f'    name: "{e["name"]}"', f'    data_type: {e["data_type"]}',
                     f'    dims: [ {", ".join(str(d) for d in e["dims"])} ]']
            if labels and e["name"] == label_output:
                lines.append('    label_filename: "labels.txt"')
            parts.append("  {\n" + "\n".join(lines) + "\n  }")
        return ",\n".join(parts)

    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
            f"input [\n{block(inputs, False)}\n]\noutput [\n{block(outputs, True)}\n]\n"
            f"dynamic_batching {{\n  preferred_batch_size: [ {', '.join(str(b) for b in preferred)} ]\n"
            f"  max_queue_delay_microseconds: 100\n}}\n")


_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([\[\]{}:,])|([^\s\[\]{}:,"#]+))')


def parse_pbtxt(text: str) -> Dict[str, object]:
    """Parse protobuf text format (messages, repeated fields, lists, scalars) into dicts and lists.

    Repeated keys and ``key [ ... ]`` lists both become Python lists.
    """
    tokens = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"cannot parse config at character {pos}: {text[pos:pos + 20]!r}")
        pos = m.end()
        if m.group(1):
            continue
        tok = m.group(2) or m.group(3) or m.group(4)
        if tok:
            tokens.append(tok)

    def scalar(tok):
        if tok.startswith('"'):
            return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
        for cast in (int, float):
            try:
                return cast(tok)
            except ValueError:
                pass
        return tok

    def value(i):
        tok = tokens[i]
        if tok == "{":
            return message(i + 1, "}")
        if tok == "[":
            items, i = [], i + 1
            while tokens[i] != "]":
                item, i = value(i)
                items.append(item)
                if tokens[i] == ",":
                    i += 1
            return items, i + 1
        return scalar(tok), i + 1

    def message(i, end):
        out: Dict[str, object] = {}
        while i < len(tokens) and tokens[i] != end:
            key = tokens[i]
            i += 1
            if tokens[i] == ":":
                i += 1
            val, i = value(i)
            if key in out:
                prev = out[key]
                out[key] = (prev if isinstance(prev, list) else [prev]) + (val if isinstance(val, list) else [val])
            else:
                out[key] = val
            if i < len(tokens) and tokens[i] == ",":
                i += 1
        if end and (i >= len(tokens) or tokens[i] != end):
            raise ValueError("unbalanced braces in config")
        return out, i + 1

    result, _ = message(0, "")
    return result


def write_triton_repository(root, onnx_path, name: str, classnames: Sequence[str], max_batch_size: int = 64,
                            preferred: Sequence[int] = (8, 16, 32)) -> Path:
    """Write a Triton model repository for ``onnx_path`` under ``root`` and check it by parsing it back."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs = _io_entries(model.graph.input)
    outputs = _io_entries(model.graph.output)
    text = render_config(name, inputs, outputs, max_batch_size, [b for b in preferred if b <= max_batch_size])
    parsed = parse_pbtxt(text)
    for kind, entries in (("input", inputs), ("output", outputs)):
        got = parsed[kind]
        if [(e["name"], e["data_type"], list(e["dims"])) for e in got] != \
                [(e["name"], e["data_type"], list(e["dims"])) for e in entries]:
            raise ValueError(f"config.pbtxt {kind} entries do not match the ONNX graph")
    if parsed["name"] != name or parsed["max_batch_size"] != max_batch_size:
        raise ValueError("config.pbtxt does not read back as written")
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
