"""promptcore.kernels: fused ops for prompt learning, each with its PyTorch reference."""

from .backend import requested_backend, triton_available, use_triton
from .cosine_logits import ScoredLogits, cosine_logits, cosine_logits_ref
from .prefix_attention import prefix_attention, prefix_attention_ref
from .prompt_assembly import assemble_prompts, assemble_prompts_ref

__all__ = [
    "ScoredLogits",
    "assemble_prompts",
    "assemble_prompts_ref",
    "cosine_logits",
    "cosine_logits_ref",
    "prefix_attention",
    "prefix_attention_ref",
    "requested_backend",
    "triton_available",
    "use_triton",
]
