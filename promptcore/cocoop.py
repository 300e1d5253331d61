"""CoCoOp: conditional context optimization (Zhou et al., 2022), as in KaiyangZhou/CoOp trainers/cocoop.py.

A meta-net maps each image's L2-normalised feature to a bias added to every context token, so
every image has its own prompts. The official code loops over the images and encodes n_cls full
77-token prompts per image; promptcore encodes all images of a batch in one pass: the prefix
(SOS + ctx + bias_b) once per image, each (image, class) suffix — class tokens, '.', EOT — attending
to its image's prefix (the engine's groups, G = B). Nothing of shape (B, n_cls, 77, D) is built.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptcore.kernels import cosine_logits

from .base import ContextPromptModule
from .engine import PromptSet
from .meta_net import build_meta_net, image_feature_dim
from .official import read_official
from .prompts import check_context_options, check_seed, clean_classnames, init_context


class CoCoOpPromptLearner(nn.Module):
    """Holds the learned context ``ctx`` (n_ctx, D), the ``meta_net`` and the prompt set of the current
    class list. State-dict keys (``ctx``, ``meta_net.linear1.*``, ``meta_net.linear2.*``) match the
    official prompt learner."""

    def __init__(self, ctx: torch.Tensor, meta_net: nn.Sequential):
        super().__init__()
        self.ctx = nn.Parameter(ctx)
        self.meta_net = meta_net
        self.prompts: Optional[PromptSet] = None

    def image_bias(self, image_features: torch.Tensor) -> torch.Tensor:
        """The meta-net output (B, D) for raw image features (B, E); the input is L2-normalised first."""
        weight = self.meta_net.linear1.weight
        normed = F.normalize(image_features, dim=-1).to(weight.dtype)
        return self.meta_net(normed)


class CoCoOp(ContextPromptModule):
    """CoCoOp over an open_clip CLIP model.

    ``logits = cocoop(images)`` gives (B, n_cls) scaled cosine logits, each image scored against
    its own prompts; ``prompt_learner.ctx`` and ``prompt_learner.meta_net`` train (CLIP is frozen).
    Text features depend on the image, so they are never cached; the class-token embeddings are
    (computed once per class list, in ``prompt_learner.prompts``).

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` with a causal text tower (others fall back
            to the full-prompt path).
        classnames: class names in label order (``_`` becomes a space, as officially).
        tokenizer: open_clip tokenizer; the default CLIP BPE tokenizer when None.
        n_ctx: context length (ignored when ``ctx_init`` is given: its word count wins).
        ctx_init: init phrase (official default "a photo of a"); random N(0, 0.02) context when None.
        text_path: "auto" (fast where exact), "fast" or "naive" (the official per-image loop).
        seed: seeds the context and meta-net init (torch's global generator is left as it was);
            None draws from the global generator, as officially.
        freeze: freeze CLIP's parameters (as the official trainer does).
        capture: "none", "compile" or "cudagraphs" (CUDA only): run the fast text path under torch.compile
            or as replayed CUDA graphs, see :mod:`promptcore.capture`.

    The meta-net and ``ctx`` take the text tower's dtype (the official trainer halves the
    meta-net when CLIP runs in fp16); the class token sits at the end, as officially.
    """

    method = "cocoop"

    def __init__(self, model: nn.Module, classnames: Sequence[str], tokenizer=None, n_ctx: int = 4,
                 ctx_init: Optional[str] = "a photo of a", text_path: str = "auto", seed: Optional[int] = None,
                 freeze: bool = True, capture: str = "none"):
        check_context_options(n_ctx, ctx_init)  # every option is checked before CLIP is touched
        check_seed(seed)
        super().__init__(model, tokenizer, text_path, freeze, capture)
        names = clean_classnames(classnames)  # fail on a bad class list before any random draw
        tower = self.engine.tower
        vis_dim = image_feature_dim(model, tower.output_dim)
        # With a seed, draw ctx then the meta-net (the official order) from a seeded global generator
        # inside fork_rng, so the caller's random state is untouched.
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            ctx, n_ctx, phrase = init_context(tower, self.tokenizer, ctx_init, n_ctx)
            meta_net = build_meta_net(vis_dim, tower.width)
        meta_net.to(device=tower.device, dtype=tower.dtype)
        self.ctx_init = ctx_init
        self.vis_dim = vis_dim
        self._init_prompts(CoCoOpPromptLearner(ctx, meta_net), classnames, n_ctx=n_ctx, prompt_prefix=phrase,
                           names=names)

    def options(self) -> Dict[str, Any]:
        return {"n_ctx": self.n_ctx, "ctx_init": self.ctx_init}

    # -- text side ----------------------------------------------------------------------------

    def text_features(self) -> torch.Tensor:
        """Not defined for CoCoOp (one class matrix per image); raises a TypeError that says what to call."""
        raise TypeError("CoCoOp's text features depend on the image: use encode_text(image_features) "
                        "or logits_from_image_features(image_features)")

    def _path(self, path: Optional[str]) -> str:
        return self.engine.resolve_path(self.text_path if path is None else path)

    def encode_text(self, image_features: torch.Tensor, path: Optional[str] = None,
                    max_images: Optional[int] = None) -> torch.Tensor:
        """Text features (B, n_cls, E) of each image's prompts, for image features (B, E).

        ``path``: "fast" (one shared-prefix pass for the batch), "naive" (the official loop: n_cls
        full prompts per image), "auto" or None (the module's ``text_path``). ``max_images`` bounds
        the fast path's activations (about B * n_cls * suffix_len * width per layer) by encoding
        that many images per pass; None encodes the whole batch in one pass.
        """
        image_features = self._check_features(image_features, max_images)
        if self._path(path) == "naive":
            return torch.stack([self._encode_one_naive(image_features[i]) for i in range(len(image_features))])
        if max_images is None:  # no slicing: keeps the batch axis symbolic under ONNX export
            return self._encode_fast(image_features)
        chunks = [self._encode_fast(image_features[i:i + max_images])
                  for i in range(0, len(image_features), max_images)]
        return torch.cat(chunks)

    def _encode_fast(self, image_features: torch.Tensor) -> torch.Tensor:
        learner = self.prompt_learner
        bias = learner.image_bias(image_features)  # (B, D): one prefix group per image
        return self.engine.encode(learner.prompts, learner.ctx, bias, path="fast")

    def _encode_one_naive(self, image_feature: torch.Tensor) -> torch.Tensor:
        """n_cls full prompts with ctx + bias of one image, as the official prompt learner builds them."""
        learner = self.prompt_learner
        ctx_shifted = learner.ctx + learner.image_bias(image_feature[None])  # (n_ctx, D), in the model dtype
        return self.engine.encode(learner.prompts, ctx_shifted, path="naive")[0]

    def _check_features(self, image_features: torch.Tensor, max_images: Optional[int] = None) -> torch.Tensor:
        if not isinstance(image_features, torch.Tensor) or image_features.dim() != 2 \
                or image_features.shape[1] != self.vis_dim:
            shape = tuple(image_features.shape) if isinstance(image_features, torch.Tensor) else type(image_features)
            raise ValueError(f"image features must be (B, {self.vis_dim}), got {shape}")
        if image_features.shape[0] == 0:  # not len(): it would fix the batch size when traced
            raise ValueError("image features hold no images (B = 0)")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be at least 1, got {max_images}")
        return image_features

    # -- scoring ------------------------------------------------------------------------------

    def logits_from_image_features(self, image_features: torch.Tensor, path: Optional[str] = None,
                                   max_images: Optional[int] = None) -> torch.Tensor:
        """Logits (B, n_cls) of image features (B, E) against their own prompts (see :meth:`encode_text`)."""
        image_features = self._check_features(image_features, max_images)
        scale = self.model.logit_scale
        if self._path(path) == "naive":  # the official loop: encode and score one image at a time
            rows = [self.logits(image_features[i:i + 1], self._encode_one_naive(image_features[i]))[0]
                    for i in range(len(image_features))]
            return torch.stack(rows)
        text = self.encode_text(image_features, path, max_images)  # (B, n_cls, E): each image its own classes
        return cosine_logits(image_features.unsqueeze(1), text, scale)[:, 0]

    def forward(self, images: torch.Tensor, text_path: Optional[str] = None,
                max_images: Optional[int] = None) -> torch.Tensor:
        """Logits (B, n_cls) for images (B, 3, H, W); ``text_path`` overrides the module's for this call."""
        image_features = self.encode_images(images)
        return self.logits_from_image_features(image_features, text_path, max_images)

    # -- official checkpoints -----------------------------------------------------------------

    def load_official(self, path) -> Dict[str, Any]:
        """Load a KaiyangZhou/CoOp CoCoOp checkpoint (``prompt_learner/model.pth.tar-N``, its folder, or an
        :class:`~promptcore.official.OfficialCheckpoint` already read).

        Reads ``ctx`` and ``meta_net.*``; the saved ``token_prefix``/``token_suffix`` (embeddings of
        the training classes) are dropped, as the official ``load_model`` does. CoOp or MaPLe files
        and shape mismatches raise :class:`CheckpointError` and change nothing. Returns the file's
        epoch and path.
        """
        ckpt = read_official(path, "cocoop")
        self._load_learner_state(ckpt.learner, ckpt.file, ckpt.strict)  # other keys ignored, as officially
        return ckpt.info()
