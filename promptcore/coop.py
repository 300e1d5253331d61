"""CoOp: context optimization (Zhou et al., 2022), as in KaiyangZhou/CoOp trainers/coop.py."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .base import CachedTextFeatures, ContextPromptModule
from .engine import PromptSet
from .official import read_official
from .prompts import (
    CLASS_TOKEN_POSITIONS,
    check_context_options,
    check_flag,
    check_seed,
    clean_classnames,
    init_context,
)


class CoOpPromptLearner(nn.Module):
    """Holds the learned context ``ctx`` ((n_ctx, D), or (n_cls, n_ctx, D) class-specific) and the
    prompt set of the current class list. State-dict keys match the official prompt learner."""

    def __init__(self, ctx: torch.Tensor):
        super().__init__()
        self.ctx = nn.Parameter(ctx)
        self.prompts: Optional[PromptSet] = None


class CoOp(CachedTextFeatures, ContextPromptModule):
    """CoOp over an open_clip CLIP model.

    ``logits = coop(images)`` gives (B, n_cls) scaled cosine logits; only
    ``coop.prompt_learner.ctx`` is trainable (CLIP is frozen). In eval mode the text features
    are cached until ``ctx`` or the class list changes.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` with a causal text tower (others fall back
            to the full-prompt path).
        classnames: class names in label order (``_`` becomes a space, as officially).
        tokenizer: open_clip tokenizer; the default CLIP BPE tokenizer when None.
        n_ctx: context length (ignored when ``ctx_init`` is given: its word count wins).
        ctx_init: init phrase such as "a photo of a"; random N(0, 0.02) context when None.
        csc: class-specific context (ignored with ``ctx_init``, as officially).
        class_token_position: "end", "middle" or "front".
        text_path: "auto" (fast where exact), "fast" or "naive" (official full prompts).
        seed: seed of the random context init (None: torch's global generator).
        capture: "none", "compile" (torch.compile of the fast text path) or "cudagraphs" (compiled and
            replayed as CUDA graphs; CUDA only), see :mod:`promptcore.capture`.
    """

    method = "coop"

    def __init__(self, model: nn.Module, classnames: Sequence[str], tokenizer=None, n_ctx: int = 16,
                 ctx_init: Optional[str] = None, csc: bool = False, class_token_position: str = "end",
                 text_path: str = "auto", seed: Optional[int] = None, freeze: bool = True, capture: str = "none"):
        check_context_options(n_ctx, ctx_init)  # every option is checked before CLIP is touched
        check_flag("csc", csc)
        check_seed(seed)
        super().__init__(model, tokenizer, text_path, freeze, capture)
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"unknown class token position {class_token_position!r}; "
                             f"choose one of {', '.join(CLASS_TOKEN_POSITIONS)}")
        names = clean_classnames(classnames)
        csc = bool(csc) and not ctx_init
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        ctx, n_ctx, phrase = init_context(self.engine.tower, self.tokenizer, ctx_init, n_ctx,
                                          (len(names),) if csc else (), generator=generator)
        self.ctx_init, self.csc = ctx_init, csc
        self._init_prompts(CoOpPromptLearner(ctx), classnames, n_ctx=n_ctx, prompt_prefix=phrase,
                           class_token_position=class_token_position, ctx_layout="class" if csc else "shared",
                           names=names)

    def options(self) -> Dict[str, Any]:
        return {"n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "csc": self.csc,
                "class_token_position": self.class_token_position}

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Swap the class list (base-to-new evaluation); a class-specific context must keep its count."""
        names = clean_classnames(classnames)
        if self.csc and len(names) != self.prompt_learner.ctx.shape[0]:
            raise ValueError(f"class-specific context was learned for {self.prompt_learner.ctx.shape[0]} classes, "
                             f"got {len(names)} class names")
        self._install_prompts(classnames, names)

    def _compute_text_features(self) -> torch.Tensor:
        return self.encode_text(self.text_path)

    def encode_text(self, path: str = "auto") -> torch.Tensor:
        """Text features (n_cls, E) of the current prompts, through ``path`` ("auto", "fast", "naive")."""
        learner = self.prompt_learner
        return self.engine.encode(learner.prompts, learner.ctx, path=path)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_cls) for images (B, 3, H, W)."""
        image_features = self.encode_images(images)
        return self.logits(image_features, self.text_features())

    def load_official(self, path) -> Dict[str, Any]:
        """Load a KaiyangZhou/CoOp checkpoint (``prompt_learner/model.pth.tar-N``, its folder, or an
        :class:`~promptcore.official.OfficialCheckpoint` already read); nothing changes on any error.

        The saved ``token_prefix``/``token_suffix`` (embeddings of the training classes) are
        dropped, as the official ``load_model`` does. Returns the file's epoch and path.
        """
        ckpt = read_official(path, "coop")
        self._load_learner_state(ckpt.learner, ckpt.file, ckpt.strict)
        return ckpt.info()
