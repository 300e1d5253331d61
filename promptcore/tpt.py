"""TPT: test-time prompt tuning (Shu et al., 2022), as in azshue/TPT ``tpt_classification.py``; plus ZERO
(Farina et al., 2023), its training-free follow-up.

Per test image (official rules, checked against the repository):

* views: view 0 is the image resized (bicubic) and center-cropped; the others are random resized
  crops with horizontal flips (AugMix on top for the fine-grained data sets), see
  :mod:`promptcore.views`;
* the context is reset to its initial value and AdamW (``lr``, betas (0.9, 0.999), eps 1e-8,
  weight decay 0.01) starts from fresh state;
* logits of all views (fp32, :func:`promptcore.kernels.cosine_logits` per image against its own tuned
  classifier, with the views' softmax entropies from the same op); the ``int(V * selection)`` views of
  lowest softmax entropy are kept
  (``argsort`` ascending; promptcore sorts stably, so ties go to the lower view index). The
  selection is made on the FIRST step's logits and reused at later steps (the logits of all views
  are recomputed with the updated context, then indexed with the first selection);
* loss = entropy of the mean probability of the kept views, computed as the official
  ``avg_entropy``: ``logp = x - logsumexp(x)``, ``avg = logsumexp(logp, views) - log(k)`` clamped at
  the dtype's min, ``loss = -(avg * exp(avg)).sum()``;
* ``steps`` optimizer steps, then the prediction on view 0 with the tuned context.

promptcore tunes many images at once: the context is a (N, K, D) tensor (the engine's "group"
layout: one prompt prefix per image), the per-image losses are summed, and :class:`BatchedAdamW`
(:mod:`promptcore.optim`) applies torch.optim.AdamW's elementwise arithmetic to the stack, so N
images tuned together give the results of N sequential runs. Image features of the views are
computed once (the encoder is frozen) and reused at every step; the official code recomputes them each step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptcore.kernels import cosine_logits

from .base import CachedTextFeatures, ContextPromptModule
from .checkpoints import CheckpointError, read_prompt_file
from .engine import PromptSet
from .meta_net import build_meta_net, image_feature_dim, meta_net_shapes
from .models import square_image_size
from .official import LearnerSpec, OfficialCheckpoint, read_context_source
from .optim import BatchedAdamW
from .prompts import (
    CLASS_TOKEN_POSITIONS,
    check_context_options,
    check_flag,
    check_integer,
    check_number,
    check_seed,
    clean_classnames,
    init_context,
)
from .selection import avg_entropy, check_fraction, kept_views, select_confident, zero_vote
from .views import as_image_list, require_finite

# "amp" is the official ``torch.cuda.amp.autocast()``: fp16 autocast for CUDA tensors and nothing
# elsewhere (fp32 on CPU). "amp_bf16" opts into bf16 autocast on any device (faster on CPUs with bf16
# units, not the official computation). "native" runs in the weights' own dtype.
PRECISIONS = ("amp", "amp_bf16", "native")
MODES = ("tpt", "zero")
META_NET_INPUTS = ("raw", "normalized")
# torch.cuda.amp.GradScaler(init_scale=1000) in the official script; only fp16 needs loss scaling.
OFFICIAL_LOSS_SCALE = 1000.0


@dataclass
class TPTOutput:
    """Result of :meth:`TPT.adapt` for N images.

    ``logits`` (N, n_cls) fp32: view 0 scored with the tuned context; ``ctx`` (N, K, D) fp32: the
    tuned contexts; ``selected`` (N, k): the confident views (chosen at the first step);
    ``losses`` (steps, N): each image's loss before each optimizer step.
    """

    logits: torch.Tensor
    ctx: torch.Tensor
    selected: torch.Tensor
    losses: torch.Tensor

    @property
    def preds(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)


@dataclass
class ZeroOutput:
    """Result of :meth:`TPT.zero`: ``preds`` (N,), ``votes`` (N, n_cls) argmax counts of the confident
    views, ``selected`` (N, k) the confident views, ``logits`` (N, V, n_cls) fp32 logits of all views."""

    preds: torch.Tensor
    votes: torch.Tensor
    selected: torch.Tensor
    logits: torch.Tensor


# -- the module -----------------------------------------------------------------------------


class TPTPromptLearner(nn.Module):
    """Holds the initial context ``ctx`` (n_ctx, D) -- TPT never changes it: every image tunes its own
    copy -- the prompt set (one prefix per image) and, for a CoCoOp initialisation, ``meta_net``."""

    def __init__(self, ctx: torch.Tensor):
        super().__init__()
        self.ctx = nn.Parameter(ctx, requires_grad=False)
        self.meta_net: Optional[nn.Sequential] = None
        self.prompts: Optional[PromptSet] = None


class TPT(CachedTextFeatures, ContextPromptModule):
    """Test-time prompt tuning over an open_clip CLIP model.

    ``tpt.predict(images)`` makes views of raw images on their device and tunes each image on its
    own views (many images at once); ``tpt.adapt(views)`` does the same for pre-made views
    (N, V, 3, H, W) whose view 0 is the original. ``tpt.zero(views)`` is ZERO (no backward).

    Args:
        model: an open_clip CLIP model (frozen; fp32 weights for ``precision="amp"``, or fp16/bf16).
        classnames: class names in label order.
        tokenizer: open_clip tokenizer (default: the CLIP BPE tokenizer).
        n_ctx, ctx_init: context length, or the init phrase (its word count wins), as CoOp.
        n_views: views per image made by :meth:`predict` (view 0 included; official 64).
        selection: fraction of confident views kept (official 0.1; ``int(V * selection) >= 1``).
        lr, steps, weight_decay: AdamW learning rate, optimizer steps per image, decoupled decay.
        augmix: AugMix views (the official choice for the fine-grained data sets).
        precision: "amp" runs fp32 weights as the official ``torch.cuda.amp.autocast()`` does: fp16
            autocast on CUDA, plain fp32 on any other device. "amp_bf16" runs fp32 weights under bf16
            autocast on every device (an opt-in speed-up, not the official computation). "native" runs
            in the weights' dtype. Default: "amp" for fp32 weights, "native" otherwise.
        batch_size: images tuned together by :meth:`predict`.
        cocoop_meta_net: hold a CoCoOp meta-net (set by :meth:`init_from_cocoop`).
        meta_net_input: "raw" (official TPT+CoCoOp: the unnormalised view-0 feature) or "normalized".
        seed: seed of the random context init and the default view generator.
        capture: "none", "compile" or "cudagraphs" (CUDA only): run the fast text path under torch.compile
            or as replayed CUDA graphs, see :mod:`promptcore.capture`.
    """

    method = "tpt"

    def __init__(self, model: nn.Module, classnames: Sequence[str], tokenizer=None, n_ctx: int = 4,
                 ctx_init: Optional[str] = "a photo of a", n_views: int = 64, selection: float = 0.1,
                 lr: float = 5e-3, steps: int = 1, weight_decay: float = 0.01, augmix: bool = False,
                 precision: Optional[str] = None, batch_size: int = 8, class_token_position: str = "end",
                 text_path: str = "auto", cocoop_meta_net: bool = False, meta_net_input: str = "raw",
                 image_batch: int = 256, seed: Optional[int] = None, freeze: bool = True, capture: str = "none"):
        # every option is checked before CLIP is touched
        check_context_options(n_ctx, ctx_init)
        _check_options(n_views, selection, lr, steps, weight_decay, batch_size, image_batch)
        check_flag("augmix", augmix)
        check_flag("cocoop_meta_net", cocoop_meta_net)
        check_seed(seed)
        super().__init__(model, tokenizer, text_path, freeze, capture)
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"unknown class token position {class_token_position!r}; "
                             f"choose one of {', '.join(CLASS_TOKEN_POSITIONS)}")
        if meta_net_input not in META_NET_INPUTS:
            raise ValueError(f"meta_net_input must be one of {META_NET_INPUTS}, got {meta_net_input!r}")
        weights = self.engine.tower.dtype
        if precision is None:
            precision = "amp" if weights == torch.float32 else "native"
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision != "native" and weights != torch.float32:
            raise ValueError(f"precision {precision!r} runs fp32 weights under autocast; this model is {weights}: "
                             "use precision='native'")
        names = clean_classnames(classnames)  # validate before anything is built
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        ctx, n_ctx, phrase = init_context(self.engine.tower, self.tokenizer, ctx_init, n_ctx, generator=generator)
        self.ctx_init = ctx_init
        self.n_views, self.selection, self.lr, self.steps = int(n_views), float(selection), float(lr), int(steps)
        self.weight_decay, self.augmix, self.precision = float(weight_decay), bool(augmix), precision
        self.batch_size, self.image_batch, self.seed = int(batch_size), int(image_batch), seed
        self.meta_net_input = meta_net_input
        self._init_prompts(TPTPromptLearner(ctx), classnames, n_ctx=n_ctx, prompt_prefix=phrase,
                           class_token_position=class_token_position, ctx_layout="group", names=names)
        if cocoop_meta_net:  # frozen, outside CLIP: drawn after the context, as before
            self._add_meta_net()

    # -- options, classes, precision --------------------------------------------------------

    def options(self) -> Dict[str, Any]:
        return {"n_ctx": self.n_ctx, "ctx_init": self.ctx_init, "n_views": self.n_views, "selection": self.selection,
                "lr": self.lr, "steps": self.steps, "weight_decay": self.weight_decay, "augmix": self.augmix,
                "precision": self.precision, "batch_size": self.batch_size,
                "class_token_position": self.class_token_position,
                "cocoop_meta_net": self.prompt_learner.meta_net is not None, "meta_net_input": self.meta_net_input}

    @property
    def num_classes(self) -> int:
        return self.prompt_learner.prompts.num_classes

    def autocast(self):
        """The autocast context of the precision: fp16 on CUDA for "amp", bf16 for "amp_bf16", else none."""
        dtype = self.compute_dtype
        if dtype == self.engine.tower.dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.engine.tower.device.type, dtype=dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the encoders compute in."""
        if self.precision == "amp" and self.engine.tower.device.type == "cuda":
            return torch.float16
        if self.precision == "amp_bf16":
            return torch.bfloat16
        return self.engine.tower.dtype

    @property
    def loss_scale(self) -> float:
        """Loss scale of the backward pass: the official GradScaler's 1000 where gradients are fp16, else 1."""
        return OFFICIAL_LOSS_SCALE if self.compute_dtype == torch.float16 else 1.0

    # -- encoders ---------------------------------------------------------------------------

    def check_views(self, views: torch.Tensor) -> None:
        """Raise a clear error for views that are not (N, V >= 2, 3, H, W) images the model accepts."""
        if not isinstance(views, torch.Tensor):
            raise TypeError(f"views must be a tensor, got {type(views).__name__}")
        if views.dim() != 5 or views.shape[2] != 3:
            raise ValueError(f"views must be (N, V, 3, H, W) with view 0 the original, got {tuple(views.shape)}")
        if views.shape[0] == 0:
            raise ValueError("views hold no image (N = 0)")
        if views.shape[1] < 2:
            raise ValueError(f"TPT needs at least 2 views per image (view 0 + augmented), got {views.shape[1]}")
        kept_views(views.shape[1], self.selection)
        self.check_images(views[:, 0])
        require_finite(views, "views")

    @torch.no_grad()
    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """Image features (N, V, E) of the views, computed once (the image encoder is frozen)."""
        self.check_views(views)
        N, V = views.shape[:2]
        flat = views.reshape(N * V, *views.shape[2:])
        feats = []
        with self.autocast():
            for start in range(0, flat.shape[0], self.image_batch):
                feats.append(self.model.encode_image(flat[start:start + self.image_batch].to(self.image_dtype)))
        return torch.cat(feats).reshape(N, V, -1)

    def encode_text_groups(self, ctx: torch.Tensor, path: Optional[str] = None) -> torch.Tensor:
        """Text features (G, n_cls, E) for per-image contexts ``ctx`` (G, K, D), one prompt prefix per image."""
        with self.autocast():
            return self.engine.encode(self.prompt_learner.prompts, ctx, path=path or self.text_path)

    def initial_context(self, image_features: torch.Tensor) -> torch.Tensor:
        """The initial context of each image, (N, K, D) fp32: ``ctx``, plus the meta-net bias of the view-0
        feature with a CoCoOp initialisation (official TPT+CoCoOp ``gen_ctx(images, aug=True)``)."""
        N = image_features.shape[0]
        ctx = self.prompt_learner.ctx.detach().float()
        meta = self.prompt_learner.meta_net
        if meta is None:
            return ctx.unsqueeze(0).expand(N, -1, -1).clone()
        feat = image_features[:, 0]
        if self.meta_net_input == "normalized":
            feat = F.normalize(feat.float(), dim=-1)
        with torch.no_grad(), self.autocast():
            bias = meta(feat.to(meta[0].weight.dtype))
        return (ctx.unsqueeze(0) + bias.float().unsqueeze(1)).contiguous()

    def _learned_tensors(self) -> Sequence[torch.Tensor]:
        return [self.prompt_learner.ctx]

    def _compute_text_features(self) -> torch.Tensor:
        return self.encode_text_groups(self.prompt_learner.ctx.unsqueeze(0))[0]

    # -- TPT ----------------------------------------------------------------------------------

    def adapt(self, views: torch.Tensor, steps: Optional[int] = None, text_path: Optional[str] = None) -> TPTOutput:
        """Tune each image's context on its own views (N, V, 3, H, W), all images at once.

        View 0 is the original image; its logits with the tuned context are the prediction.
        """
        steps = self.steps if steps is None else check_integer("steps", steps, 1)
        feats = self.encode_views(views)
        return self.adapt_features(feats, steps=steps, text_path=text_path)

    def adapt_features(self, image_features: torch.Tensor, steps: Optional[int] = None,
                       text_path: Optional[str] = None) -> TPTOutput:
        """:meth:`adapt` from precomputed view features (N, V, E)."""
        steps = self.steps if steps is None else check_integer("steps", steps, 1)
        if image_features.dim() != 3 or image_features.shape[1] < 2:
            raise ValueError(f"image features must be (N, V >= 2, E), got {tuple(image_features.shape)}")
        scale = self.model.logit_scale.detach()
        ctx = self.initial_context(image_features).requires_grad_(True)
        optimizer = BatchedAdamW(ctx, self.lr, weight_decay=self.weight_decay)
        loss_scale = self.loss_scale
        inv_scale = torch.tensor(loss_scale, dtype=torch.float64).reciprocal().float().item()
        selected, losses = None, []
        with torch.enable_grad():
            for _ in range(steps):
                text = self.encode_text_groups(ctx, text_path)
                if selected is None:  # the official code selects once, on the first step's logits
                    logits, entropy, _ = cosine_logits(image_features, text, scale, with_entropy=True,
                                                       out_dtype=torch.float32)
                    selected = select_confident(logits.detach(), self.selection, entropy)
                else:
                    logits = cosine_logits(image_features, text, scale, out_dtype=torch.float32)
                kept = logits.gather(1, selected.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
                loss = avg_entropy(kept)  # (N,)
                losses.append(loss.detach())
                (grad,) = torch.autograd.grad(loss.sum() * loss_scale, ctx)
                finite = None
                if loss_scale != 1.0:
                    grad = grad * inv_scale  # GradScaler.unscale_: multiply by the fp32 reciprocal
                    finite = torch.isfinite(grad).flatten(1).all(dim=1)
                optimizer.step(grad, finite)
        ctx = ctx.detach()
        with torch.no_grad():
            text = self.encode_text_groups(ctx, text_path)
            final = cosine_logits(image_features[:, :1], text, scale, out_dtype=torch.float32)[:, 0]
        return TPTOutput(final, ctx, selected, torch.stack(losses))

    # -- ZERO -----------------------------------------------------------------------------------

    @torch.no_grad()
    def zero(self, views: torch.Tensor, selection: float = 0.3) -> ZeroOutput:
        """ZERO (training-free): vote of the confident views' argmax predictions, no backward.

        ``selection`` is ZERO's gamma (its paper and code use 0.3); see :func:`zero_vote`.
        """
        check_fraction(selection)
        feats = self.encode_views(views)
        return self.zero_features(feats, selection)

    @torch.no_grad()
    def zero_features(self, image_features: torch.Tensor, selection: float = 0.3) -> ZeroOutput:
        """:meth:`zero` from precomputed view features (N, V, E)."""
        scale = self.model.logit_scale.detach()
        if self.prompt_learner.meta_net is None:
            text = self.text_features().unsqueeze(0).expand(image_features.shape[0], -1, -1)
        else:
            text = self.encode_text_groups(self.initial_context(image_features))
        logits, entropy, view_argmax = cosine_logits(image_features, text, scale, with_entropy=True,
                                                     out_dtype=torch.float32)
        preds, votes, selected = zero_vote(logits, selection, entropy, view_argmax)
        return ZeroOutput(preds, votes, selected, logits)

    # -- raw images ----------------------------------------------------------------------------

    def make_views(self, images, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Views (N, n_views, 3, S, S) of raw images, made on their device (see :func:`promptcore.views.make_views`)."""
        from .views import make_views

        size = square_image_size(self.model)
        generator = generator if generator is not None else self._default_generator()
        return make_views(images, self.n_views, size, generator=generator, augmix=self.augmix)

    def _default_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed if self.seed is not None else 0)

    def predict_logits(self, images, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """TPT logits (N, n_cls) of raw images (see :meth:`predict`)."""
        images = as_image_list(images)
        generator = generator if generator is not None else self._default_generator()
        out = []
        for start in range(0, len(images), self.batch_size):
            out.append(self.adapt(self.make_views(images[start:start + self.batch_size], generator)).logits)
        return torch.cat(out)

    def predict(self, images, mode: str = "tpt", generator: Optional[torch.Generator] = None,
                zero_selection: float = 0.3) -> torch.Tensor:
        """Class predictions (N,) of raw images: each tuned on its own views, ``batch_size`` at a time.

        ``images``: (N, 3, H, W) or a list of (3, H, W) tensors of any size, uint8 (0..255) or float
        (0..1), on the model's device. ``mode="zero"`` predicts with ZERO instead of tuning. Views
        come from ``generator`` (default: one seeded with ``seed``, or 0).
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "zero":
            check_fraction(zero_selection)
        images = as_image_list(images)
        generator = generator if generator is not None else self._default_generator()
        preds = []
        for start in range(0, len(images), self.batch_size):
            views = self.make_views(images[start:start + self.batch_size], generator)
            preds.append(self.adapt(views).preds if mode == "tpt" else self.zero(views, zero_selection).preds)
        return torch.cat(preds)

    def forward(self, images) -> torch.Tensor:
        """TPT logits (N, n_cls) of raw images."""
        return self.predict_logits(images)

    # -- initialisation from checkpoints ----------------------------------------------------------

    def _add_meta_net(self) -> None:
        tower = self.engine.tower
        meta = build_meta_net(image_feature_dim(self.model, tower.output_dim), tower.width)
        meta.to(device=tower.device, dtype=tower.dtype)
        meta.requires_grad_(False)
        self.prompt_learner.meta_net = meta

    def init_from_coop(self, path) -> Dict[str, Any]:
        """Initialise from a CoOp context: an official KaiyangZhou/CoOp checkpoint (file or folder) or a
        promptcore CoOp prompt file (``.safetensors``). Its ``ctx`` must be generic (n_ctx, D) with this
        TPT's n_ctx (the official script asserts the same). Nothing changes on error."""
        return self._init_from(read_context_source(path, "coop"))

    def init_from_cocoop(self, path) -> Dict[str, Any]:
        """Initialise from a CoCoOp checkpoint: ``ctx`` and ``meta_net``. As the official TPT+CoCoOp, each
        image's initial context is ``ctx + meta_net(f0)`` with f0 the view-0 image feature (unnormalised
        unless ``meta_net_input="normalized"``), and that shifted context is what TPT tunes."""
        return self._init_from(read_context_source(path, "cocoop"))

    def load_official(self, path) -> Dict[str, Any]:
        """Initialise from an official CoOp or CoCoOp checkpoint (whichever it holds)."""
        return self._init_from(read_context_source(path, ("coop", "cocoop")))

    def _init_from(self, ckpt: OfficialCheckpoint) -> Dict[str, Any]:
        """Take the initial context (and a CoCoOp file's meta-net) after checking every tensor against
        what this TPT holds; nothing changes on error."""
        tower = self.engine.tower
        shapes = {"ctx": tuple(self.prompt_learner.ctx.shape)}
        if ckpt.method == "cocoop":
            shapes.update(meta_net_shapes(image_feature_dim(self.model, tower.output_dim), tower.width))
        state = LearnerSpec.of(self, shapes).check(ckpt.learner, ckpt.file, strict=False)
        if ckpt.method == "cocoop":
            self._add_meta_net()  # a fresh one, assigned once built
            meta = self.prompt_learner.meta_net
            with torch.no_grad():
                for key in shapes:
                    if key.startswith("meta_net."):
                        meta.get_parameter(key[len("meta_net."):]).copy_(state[key])
        else:
            self.prompt_learner.meta_net = None
        with torch.no_grad():
            self.prompt_learner.ctx.copy_(state["ctx"].to(self.prompt_learner.ctx.dtype))
        self.clear_cache()
        return {**ckpt.info(), "method": ckpt.method}

    def load(self, path) -> Dict[str, Any]:
        """Load a promptcore TPT prompt file; a file with a meta-net gives this TPT one. Every tensor is checked
        against what this TPT will hold before anything changes: on any error the module is as it was."""
        tensors, meta = read_prompt_file(path)
        if meta["method"] != self.method:
            raise CheckpointError(f"{path} holds {meta['method']} prompts, this module is {self.method}")
        learner = self.prompt_learner
        with_meta = learner.meta_net is not None or any(k.startswith("meta_net.") for k in tensors)
        shapes = {"ctx": tuple(learner.ctx.shape)}
        if with_meta:
            tower = self.engine.tower
            shapes.update(meta_net_shapes(image_feature_dim(self.model, tower.output_dim), tower.width))
        state = LearnerSpec.of(self, shapes).check(tensors, path, strict=True)
        if learner.meta_net is None and with_meta:
            self._add_meta_net()  # only now that the file passed every check
        with torch.no_grad():
            for key, target in learner.state_dict().items():
                target.copy_(state[key].to(device=target.device, dtype=target.dtype))
        self.clear_cache()
        return meta


# -- validation helpers -------------------------------------------------------------------------


def _check_options(n_views, selection, lr, steps, weight_decay, batch_size, image_batch) -> None:
    check_integer("n_views", n_views, 2)
    check_fraction(selection)
    kept_views(n_views, selection)
    check_integer("steps", steps, 1)
    check_number("lr", lr, positive=True)
    check_number("weight_decay", weight_decay)
    check_integer("batch_size", batch_size, 1)
    check_integer("image_batch", image_batch, 1)
