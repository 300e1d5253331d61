"""MaPLe: multi-modal prompt learning (Khattak et al., 2023), as in
muzairkhattak/multimodal-prompt-learning (trainers/maple.py, clip/model.py).

Text side: ``[SOS][P1..Pn] rest-of-init-phrase {name}.`` where the n learned context vectors
``ctx`` replace the first n tokens after SOS; before text blocks 1..J-1 (0-based) positions
1..n are overwritten with that block's ``compound_prompts_text[j-1]``. It runs through the
shared text engine (``LayerPrompts``), so prefix sharing and EOT truncation still apply.

Image side: ``proj(ctx)`` gives n shared visual prompts appended after [CLS + patches] (after
the positional embedding, before ``ln_pre``); before vision blocks 1..J-1 the last n tokens are
overwritten with ``compound_prompt_projections[j-1](compound_prompts_text[j-1])``. The feature is
read at CLS as usual. :func:`encode_image_with_prompts` is promptcore's own forward over an
open_clip ``VisionTransformer``'s weights (open_clip is not patched).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .base import CachedTextFeatures, ContextPromptModule
from .engine import LayerPrompts, PromptSet
from .official import check_clip_tensors, read_official
from .prompts import (
    check_context_budget,
    check_context_options,
    check_n_ctx,
    check_seed,
    clean_classnames,
    count_tokens,
    init_phrase,
    tokenize,
)
from .tower import UnsupportedModelError

# Official MaPLe uses the init phrase only for short contexts (``if ctx_init and n_ctx <= 4``).
MAX_INIT_CTX = 4


def check_vision_tower(model: nn.Module) -> nn.Module:
    """The model's open_clip ``VisionTransformer``, or a clear error for towers MaPLe cannot prompt."""
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if visual is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no image tower (model.visual)")
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"MaPLe needs a ViT image tower (open_clip VisionTransformer); this model's is {type(visual).__name__} "
            "(ResNet and timm towers have no token sequence to prompt)"
        )
    if getattr(visual, "attn_pool", None) is not None:
        raise UnsupportedModelError("MaPLe does not support ViT towers with attentional pooling (CoCa-style)")
    if getattr(visual, "pool_type", "tok") != "tok":
        raise UnsupportedModelError(
            f"MaPLe reads the image feature at the CLS token; this tower pools with {visual.pool_type!r}"
        )
    return visual


def _run_block(blk: nn.Module, x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    if batch_first:
        return blk(x, attn_mask=None)
    return blk(x.transpose(0, 1), attn_mask=None).transpose(0, 1)


def encode_image_with_prompts(visual: nn.Module, images: torch.Tensor, shared_prompts: Optional[torch.Tensor] = None,
                              deep_prompts: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Image features (B, E) of an open_clip ViT with MaPLe's visual prompts.

    ``shared_prompts`` (n, width) are appended after [CLS + patches] before ``ln_pre``;
    ``deep_prompts[j]`` (n, width) overwrites the last n tokens before block j + 1. With no
    prompts this is open_clip's own ``VisionTransformer.forward`` (pooled output).
    """
    if deep_prompts and shared_prompts is None:
        raise ValueError("deep visual prompts need shared prompts to overwrite")
    if len(deep_prompts) >= len(visual.transformer.resblocks):
        raise ValueError(f"{len(deep_prompts)} deep visual prompts for a tower of "
                         f"{len(visual.transformer.resblocks)} blocks (at most blocks - 1)")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))
    batch = x.shape[0]
    x = x.reshape(batch, x.shape[1], -1).transpose(1, 2)  # (B, grid*grid, width)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, 1, -1)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)  # identity in eval mode; keeps CLS when active
    n = 0
    if shared_prompts is not None:
        n = shared_prompts.shape[0]
        x = torch.cat([x, shared_prompts.to(x.dtype).unsqueeze(0).expand(batch, -1, -1)], dim=1)
    x = visual.ln_pre(x)
    batch_first = bool(getattr(visual.transformer, "batch_first", True))
    for i, blk in enumerate(visual.transformer.resblocks):
        if 1 <= i <= len(deep_prompts):
            deep = deep_prompts[i - 1].to(x.dtype).unsqueeze(0).expand(batch, -1, -1)
            x = torch.cat([x[:, : x.shape[1] - n], deep], dim=1)
        x = _run_block(blk, x, batch_first)
    # LayerNorm acts per token, so ln_post before or after taking CLS (final_ln_after_pool) agree.
    pooled = visual.ln_post(x[:, 0])
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


def maple_init_context(tower, tokenizer, ctx_init: Optional[str], n_ctx: int) -> Tuple[torch.Tensor, str]:
    """MaPLe's initial context and prompt phrase (uses the global RNG for the random case).

    Unlike CoOp, ``n_ctx`` stays as given: with an init phrase (used when ``n_ctx <= 4``, as
    officially) the context is the embedding of the phrase's first ``n_ctx`` tokens while the
    prompt keeps the whole phrase ("a photo of a", n_ctx=2 -> ``[SOS][P1][P2] of a {name}.``).
    Otherwise N(0, 0.02) in the tower's dtype with phrase ``"X X ... X"``.
    """
    dtype = tower.dtype
    if ctx_init and n_ctx <= MAX_INIT_CTX:
        phrase = init_phrase(ctx_init)
        available = count_tokens(tokenizer, phrase)
        check_context_budget(available, tower.context_length, f"ctx_init={phrase!r}")
        if n_ctx > available:
            raise ValueError(f"n_ctx={n_ctx} does not fit the init phrase {phrase!r}, which has only {available} "
                             "tokens (the context would overwrite class-name tokens)")
        ids = tokenize(tokenizer, [phrase], tower.context_length)
        with torch.no_grad():
            emb = tower.token_embedding(ids.to(tower.device)).to(dtype)
        return emb[0, 1:1 + n_ctx].detach().clone().cpu(), phrase
    ctx = torch.empty(n_ctx, tower.width, dtype=dtype)
    nn.init.normal_(ctx, std=0.02)
    return ctx, " ".join(["X"] * n_ctx)


class MaPLePromptLearner(nn.Module):
    """MaPLe's learned prompts; state-dict keys match the official ``MultiModalPromptLearner``
    (``ctx``, ``proj.*``, ``compound_prompts_text.j``, ``compound_prompt_projections.j.*``)."""

    def __init__(self, ctx: torch.Tensor, proj: nn.Linear, compound_prompts_text: Sequence[torch.Tensor],
                 compound_prompt_projections: Sequence[nn.Linear]):
        super().__init__()
        self.ctx = nn.Parameter(ctx)
        self.proj = proj
        self.compound_prompts_text = nn.ParameterList([nn.Parameter(t) for t in compound_prompts_text])
        self.compound_prompt_projections = nn.ModuleList(compound_prompt_projections)
        self.prompts: Optional[PromptSet] = None

    @property
    def n_ctx(self) -> int:
        return self.ctx.shape[0]

    def text_layer_prompts(self) -> Optional[LayerPrompts]:
        """Deep text prompts: block j (1..J-1) gets ``compound_prompts_text[j-1]`` at positions 1..n_ctx."""
        if len(self.compound_prompts_text) == 0:
            return None
        values = {j + 1: p for j, p in enumerate(self.compound_prompts_text)}
        return LayerPrompts(positions=list(range(1, 1 + self.n_ctx)), values=values)

    def visual_prompts(self) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(shared visual prompts ``proj(ctx)``, deep visual prompts for blocks 1..J-1)."""
        shared = self.proj(self.ctx)
        deep = [layer(p) for layer, p in zip(self.compound_prompt_projections, self.compound_prompts_text)]
        return shared, deep


class MaPLe(CachedTextFeatures, ContextPromptModule):
    """MaPLe over an open_clip CLIP model with a ViT image tower.

    ``logits = maple(images)`` gives (B, n_cls) scaled cosine logits; only ``maple.prompt_learner``
    trains (CLIP is frozen). In eval mode the text features are cached until the prompts or the
    class list change; the visual prompts are applied on every image batch.

    Precision follows the official fp16 setup: with a half-precision (fp16/bf16) model, ``ctx``
    and ``proj`` are in that dtype while ``compound_prompts_text`` and
    ``compound_prompt_projections`` stay fp32 (their outputs are rounded to the model dtype where
    they enter the towers). With an fp32 model everything is fp32.

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` with a ViT image tower (class-token pooling).
        classnames: class names in label order (``_`` becomes a space, as officially).
        tokenizer: open_clip tokenizer; the default CLIP BPE tokenizer when None.
        n_ctx: learned context tokens per modality (and per deep layer).
        ctx_init: init phrase; used when ``n_ctx <= 4`` (as officially), else random N(0, 0.02).
        depth: prompt depth J (1 = shallow: first-layer prompts only); at most the number of blocks
            of either tower.
        text_path: "auto" (fast where exact), "fast" or "naive" (official full prompts).
        seed: seed of the random parts of the init (None: torch's global generator). The init draws
            in the official order (ctx, proj, compound prompts, one projection cloned J-1 times).
        capture: "none", "compile" or "cudagraphs" (CUDA only): run the fast text path under torch.compile
            or as replayed CUDA graphs, see :mod:`promptcore.capture`.
    """

    method = "maple"

    def __init__(self, model: nn.Module, classnames: Sequence[str], tokenizer=None, n_ctx: int = 2,
                 ctx_init: Optional[str] = "a photo of a", depth: int = 9, text_path: str = "auto",
                 seed: Optional[int] = None, freeze: bool = True, capture: str = "none"):
        check_context_options(n_ctx, ctx_init)  # every option is checked before CLIP is touched
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an integer >= 1 (1 = shallow MaPLe), got {depth!r}")
        check_seed(seed)
        super().__init__(model, tokenizer, text_path, freeze, capture)
        visual = check_vision_tower(model)
        tower = self.engine.tower
        names = clean_classnames(classnames)
        text_blocks, vision_blocks = len(tower.blocks), len(visual.transformer.resblocks)
        if depth > min(text_blocks, vision_blocks):
            raise ValueError(f"depth={depth} exceeds the model's blocks (text tower {text_blocks}, "
                             f"image tower {vision_blocks}); use depth <= {min(text_blocks, vision_blocks)}")
        check_n_ctx(n_ctx, tower.context_length)
        self.ctx_init, self.depth = ctx_init, depth
        self.vision_width = visual.class_embedding.shape[0]
        learner, phrase = self._build_learner(tower, n_ctx, ctx_init, depth, seed)
        self._init_prompts(learner, classnames, n_ctx=n_ctx, prompt_prefix=phrase, names=names)

    def _build_learner(self, tower, n_ctx, ctx_init, depth, seed) -> Tuple[MaPLePromptLearner, str]:
        low = tower.dtype
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            ctx, phrase = maple_init_context(tower, self.tokenizer, ctx_init, n_ctx)
            proj = nn.Linear(tower.width, self.vision_width).to(low)  # official: proj.half() with fp16 CLIP
            compound = [nn.init.normal_(torch.empty(n_ctx, tower.width), std=0.02) for _ in range(depth - 1)]
            # Official ``_get_clones``: deep copies of ONE Linear, so all projections start identical.
            single = nn.Linear(tower.width, self.vision_width)
            projections = [copy.deepcopy(single) for _ in range(depth - 1)]
        learner = MaPLePromptLearner(ctx, proj, compound, projections)
        return learner.to(tower.device), phrase

    def options(self) -> Dict[str, Any]:
        return {"n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "depth": self.depth}

    # -- encoding -----------------------------------------------------------------------------

    def _learned_tensors(self) -> Sequence[torch.Tensor]:
        learner = self.prompt_learner  # the text side reads ctx and the deep text prompts, not the projections
        return [learner.ctx, *learner.compound_prompts_text]

    def _compute_text_features(self) -> torch.Tensor:
        return self.encode_text(self.text_path)

    def encode_text(self, path: str = "auto") -> torch.Tensor:
        """Text features (n_cls, E) with the deep text prompts, through ``path`` ("auto", "fast", "naive")."""
        learner = self.prompt_learner
        layer_prompts = learner.text_layer_prompts()
        return self.engine.encode(learner.prompts, learner.ctx, path=path, layer_prompts=layer_prompts)[0]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image features (B, E) with the shared and deep visual prompts (images cast to the model dtype)."""
        self.check_images(images)
        shared, deep = self.prompt_learner.visual_prompts()
        return encode_image_with_prompts(self.model.visual, images.to(self.image_dtype), shared, deep)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_cls) for images (B, 3, H, W)."""
        image_features = self.encode_images(images)
        return self.logits(image_features, self.text_features())

    # -- official checkpoints -----------------------------------------------------------------

    def load_official(self, path) -> Dict[str, Any]:
        """Load an official MaPLe checkpoint (``MultiModalPromptLearner/model.pth.tar-N``, its folder, or an
        :class:`~promptcore.official.OfficialCheckpoint` already read).

        Only ``prompt_learner.*`` is loaded (``token_prefix``/``token_suffix`` are dropped, as the
        official ``load_model`` does). The CLIP weights saved beside it (``image_encoder.*``,
        ``text_encoder.*``, ``logit_scale``) must equal this model's, exactly or up to fp16
        rounding; otherwise the first differing key is named. Nothing changes on any error.
        Returns the file, its epoch and how many CLIP tensors were checked.
        """
        ckpt = read_official(path, "maple")
        sos_embedding = self.engine.tower.token_embedding.weight[self.prompt_learner.prompts.ids[0, 0]].detach()
        # the CLIP check runs after the prompt tensors' own checks and before anything changes
        checked = self._load_learner_state(ckpt.learner, ckpt.file, ckpt.strict, before_copy=lambda: check_clip_tensors(
            ckpt, self._official_clip_tensors(), sos_embedding))
        return {**ckpt.info(), "clip_tensors_checked": checked}

    def _official_clip_tensors(self) -> Dict[str, torch.Tensor]:
        """This model's CLIP tensors under the official ``CustomCLIP`` names."""
        out = {f"image_encoder.{k}": v for k, v in self.model.visual.state_dict().items()}
        text_keys = ("transformer.", "positional_embedding", "ln_final.", "text_projection")
        for k, v in self.engine.tower.src.state_dict().items():
            if k.startswith(text_keys):
                out[f"text_encoder.{k}"] = v
        out["logit_scale"] = self.model.logit_scale
        return out
