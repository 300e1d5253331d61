"""promptcore: fast CLIP prompt learning (shared-prefix text encoding, Triton kernels, ONNX export)."""

from .checkpoints import CheckpointError, UnsafeCheckpointError, read_torch_checkpoint
from .cocoop import CoCoOp
from .coop import CoOp
from .engine import LayerPrompts, PromptSet, TextEngine
from .maple import MaPLe
from .prompts import PromptTooLongError
from .runner import run_folder
from .tower import TextTower, UnsupportedModelError
from .tpt import TPT, TPTOutput, ZeroOutput
from .zeroshot import ZeroShot

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CoCoOp",
    "CoOp",
    "LayerPrompts",
    "MaPLe",
    "PromptSet",
    "PromptTooLongError",
    "TPT",
    "TPTOutput",
    "TextEngine",
    "TextTower",
    "UnsupportedModelError",
    "UnsafeCheckpointError",
    "ZeroOutput",
    "ZeroShot",
    "read_torch_checkpoint",
    "run_folder",
]
