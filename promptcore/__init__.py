"""promptcore: fast CLIP prompt learning (shared-prefix text encoding, Triton kernels, ONNX export)."""

from .checkpoints import CheckpointError, UnsafeCheckpointError, read_torch_checkpoint
from .coop import CoOp
from .engine import LayerPrompts, PromptSet, TextEngine
from .prompts import PromptTooLongError
from .tower import TextTower, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CoOp",
    "LayerPrompts",
    "PromptSet",
    "PromptTooLongError",
    "TextEngine",
    "TextTower",
    "UnsupportedModelError",
    "UnsafeCheckpointError",
    "read_torch_checkpoint",
]
