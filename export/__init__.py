"""promptcore.export: ONNX export of frozen prompts (see the export issue; not built yet)."""
