"""The class structure of promptcore's method modules.

* :class:`PromptModule`: what every method shares (the CLIP model, the text engine, image checks,
  cosine scoring, promptcore's own prompt files).
* :class:`ContextPromptModule`: methods whose prompts put a learned context before the class name
  (CoOp, CoCoOp, MaPLe, TPT): the prompt learner, the class list and its prompt set, freezing CLIP.
* :class:`CachedTextFeatures`: methods with one text-feature matrix per class list (CoOp, MaPLe, TPT's
  initial context, ZeroShot), cached until what it depends on changes. CoCoOp's text features depend
  on the image, so it has none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn

from promptcore.kernels import cosine_logits

from .checkpoints import CheckpointError, read_prompt_file, save_prompt_file
from .engine import PromptSet, TextEngine
from .models import image_size
from .official import LearnerSpec
from .prompts import check_flag, clean_classnames, context_prompts, default_tokenizer
from .views import require_finite


class PromptModule(nn.Module, ABC):
    """Base class of the method modules. A subclass names its ``method`` (the class attribute saved in
    prompt files) and implements :meth:`options`, :meth:`save` and :meth:`load`; nothing else is read from it.
    :class:`ContextPromptModule` implements the files for methods whose state is a prompt learner."""

    method: str = ""

    def __init__(self, model: nn.Module, tokenizer=None, text_path: str = "auto", capture: str = "none"):
        super().__init__()
        if not type(self).method:
            raise TypeError(f"{type(self).__name__} must name its method (class attribute 'method')")
        if not hasattr(model, "encode_image") or not hasattr(model, "logit_scale"):
            raise TypeError(f"{type(model).__name__} is not an open_clip CLIP model (no encode_image / logit_scale)")
        engine = TextEngine(model, capture=capture)
        engine.resolve_path(text_path)
        self.model = model
        self.engine = engine
        self.text_path = text_path
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(engine.tower.context_length)
        self.model_name: Optional[str] = None
        # Features derived from the learned prompts (see CachedTextFeatures); None when none are kept.
        self._text_cache = None
        self._classes_version = 0  # bumped on every class-list change, so caches keyed on it expire

    # -- images ---------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.tower.dtype

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error for images of the wrong type, shape or device, or with NaN/Inf pixels."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        size = image_size(self.model)
        if size is not None and tuple(images.shape[-2:]) != size:
            raise ValueError(f"images are {tuple(images.shape[-2:])} pixels, the model expects {size}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        device = self.engine.tower.device
        if images.device != device:
            raise ValueError(f"images are on {images.device}, the model is on {device}")
        require_finite(images)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Image features of the frozen image tower (images cast to the model dtype, as officially)."""
        self.check_images(images)
        return self.model.encode_image(images.to(self.image_dtype))

    @property
    def image_dtype(self) -> torch.dtype:
        """The dtype images are cast to (the patch embedding's, as the official ``clip_model.dtype``)."""
        visual = getattr(self.model, "visual", None)
        conv = getattr(visual, "conv1", None)
        if conv is not None:
            return conv.weight.dtype
        weights = [p for p in visual.parameters() if p.dim() > 1] if visual is not None else []
        return weights[0].dtype if weights else self.dtype

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """``exp(logit_scale) * normalize(img) @ normalize(txt).T`` in the image features' dtype."""
        return cosine_logits(image_features, text_features, self.model.logit_scale)

    # -- what a subclass provides ----------------------------------------------------------------

    @abstractmethod
    def options(self) -> Dict[str, Any]:
        """The constructor options that rebuild this module (saved in prompt files)."""

    def clear_cache(self) -> None:
        """Forget everything derived from the weights: cached text features and the prompt sets' token
        embeddings, which are gathered again from the token-embedding weight.

        Changes to the learned prompts and ordinary in-place writes to CLIP's weights (``load_state_dict``,
        ``copy_``, ``.to()``) are seen without it; writes through ``.data`` to CLIP's frozen weights are not
        (no version counter moves, and comparing the whole text tower on every call would cost too much):
        call this after them.
        """
        self._text_cache = None
        tower = self.engine.tower
        for sub in self.modules():
            if isinstance(sub, PromptSet):
                sub.refresh_token_embeds(tower, force=True)

    # -- promptcore files -------------------------------------------------------------------

    @abstractmethod
    def save(self, path, model_name: Optional[str] = None):
        """Write what this module learned (or built), its options and class names to a promptcore file."""

    @abstractmethod
    def load(self, path) -> Dict[str, Any]:
        """Load a promptcore file written by :meth:`save` into this module; returns its metadata."""

    @classmethod
    def from_file(cls, path, model: nn.Module, tokenizer=None, **overrides):
        """Build the module a promptcore prompt file describes (its options and class names) and load it."""
        _, meta = read_prompt_file(path)
        if cls.method and meta["method"] != cls.method:
            raise CheckpointError(f"{path} holds {meta['method']} prompts, not {cls.method}")
        options = dict(meta["options"])
        options.update(overrides)
        classnames: Sequence[str] = options.pop("classnames", None) or meta["classnames"]
        module = cls(model, classnames, tokenizer=tokenizer, **options)
        module.load(path)
        module.model_name = meta["model_name"]
        return module


class ContextPromptModule(PromptModule):
    """A method whose prompts are ``[SOS] [learned context] [class name] . [EOT]`` (CoOp, CoCoOp, MaPLe, TPT).

    A subclass validates its options, builds its prompt learner (an ``nn.Module`` holding ``ctx``; its
    ``prompts`` attribute receives the prompt set) from ``self.tokenizer`` and ``self.engine.tower``, and
    ends ``__init__`` with :meth:`_init_prompts`, which takes everything this class reads as arguments.
    """

    prompt_learner: nn.Module

    def __init__(self, model: nn.Module, tokenizer=None, text_path: str = "auto", freeze: bool = True,
                 capture: str = "none"):
        check_flag("freeze", freeze)
        super().__init__(model, tokenizer, text_path, capture)
        self._freeze = freeze

    # -- promptcore files: the prompt learner's state ----------------------------------------

    def save(self, path, model_name: Optional[str] = None):
        """Write the learned prompts, options and class names to a safetensors file (atomically)."""
        return save_prompt_file(path, dict(self.prompt_learner.state_dict()), self.method, self.options(),
                                self.classnames, model_name or self.model_name)

    def load(self, path) -> Dict[str, Any]:
        """Load a promptcore prompt file written by :meth:`save` into this module; returns its metadata.

        The file must hold this method's prompts with matching shapes; on any mismatch nothing changes.
        """
        tensors, meta = read_prompt_file(path)
        if meta["method"] != self.method:
            raise CheckpointError(f"{path} holds {meta['method']} prompts, this module is {self.method}")
        self._load_learner_state(tensors, path)
        return meta

    def _load_learner_state(self, state: Dict[str, torch.Tensor], source, strict: bool = True,
                            before_copy: Optional[Callable[[], Any]] = None) -> Any:
        """Copy ``state`` into the prompt learner after checking every key, value and shape against the
        learner's description (:class:`promptcore.official.LearnerSpec`; ``strict`` as there).

        ``before_copy`` runs after those checks and before anything changes (more checks that may raise);
        its result is returned.
        """
        checked = LearnerSpec.of(self).check(state, source, strict)
        result = before_copy() if before_copy is not None else None
        own = self.prompt_learner.state_dict()
        with torch.no_grad():
            for key, target in own.items():
                target.copy_(checked[key].to(device=target.device, dtype=target.dtype))
        self.clear_cache()
        return result

    # -- class list -----------------------------------------------------------------------------

    def _init_prompts(self, learner: nn.Module, classnames: Sequence[str], *, n_ctx: int, prompt_prefix: str,
                      class_token_position: str = "end", ctx_layout: str = "shared",
                      names: Optional[Sequence[str]] = None) -> None:
        """Install ``learner`` and the prompts of ``classnames``, then freeze CLIP (as the official trainers
        do) if asked: the last step of a subclass's ``__init__``, after every argument was validated.

        ``n_ctx`` context slots follow SOS; ``prompt_prefix`` is the text whose first ``n_ctx`` tokens
        they replace; ``ctx_layout`` is "shared", "class" (one context per class) or "group" (one per
        image); ``names``: ``clean_classnames(classnames)`` when the caller already validated them.
        """
        self.n_ctx, self.prompt_prefix = n_ctx, prompt_prefix
        self.class_token_position, self.ctx_layout = class_token_position, ctx_layout
        self.prompt_learner = learner
        self._install_prompts(classnames, names)
        if self._freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Swap the class list (e.g. base-to-new evaluation); the learned prompts are kept, and bad
        names raise before anything changes."""
        self._install_prompts(classnames)

    def _install_prompts(self, classnames: Sequence[str], names: Optional[Sequence[str]] = None) -> None:
        """Build the prompt set of ``classnames`` around the learned context and make it current.

        Raises before changing anything on bad names.
        """
        if names is None:
            names = clean_classnames(classnames)
        tower = self.engine.tower
        built = context_prompts(self.tokenizer, list(names), self.n_ctx, self.prompt_prefix, tower.context_length,
                                self.class_token_position, raw_names=list(classnames))
        self.prompt_learner.prompts = PromptSet(tower, built.ids, built.slots, self.ctx_layout)
        self.classnames = list(classnames)
        self.name_lens = built.name_lens
        self._classes_version += 1
        self.clear_cache()

    @property
    def tokenized_prompts(self) -> torch.Tensor:
        """Token ids (n_cls, context_length) of the prompts as fed to the tower."""
        return self.prompt_learner.prompts.ids


class CachedTextFeatures(ABC):
    """Mixin of the methods with one text-feature matrix for the class list: :meth:`text_features`
    computes it with :meth:`_compute_text_features` and keeps it while :meth:`_cache_key` holds and
    :meth:`_use_cache` allows (by default: eval mode, no gradient to the prompt learner). Put it before
    the :class:`PromptModule` base: ``class CoOp(CachedTextFeatures, ContextPromptModule)``."""

    # read from the PromptModule it is mixed into (annotations only: no class attributes)
    prompt_learner: nn.Module
    training: bool
    text_path: str
    _text_cache: Optional[tuple]
    _classes_version: int

    @abstractmethod
    def _compute_text_features(self) -> torch.Tensor:
        """The text features (n_cls, E) of the current class list, uncached."""

    def _use_cache(self) -> bool:
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.prompt_learner.parameters())
        return not self.training and not needs_grad

    def _learned_tensors(self) -> Sequence[torch.Tensor]:
        """The learned tensors the text features depend on: compared by content on every cached call (they
        are small), so writes through ``.data``, which move no version counter, expire the cache too."""
        return list(self.prompt_learner.parameters())

    def _cache_key(self):
        params = tuple(_tensor_key(p) for p in self.prompt_learner.parameters())
        return params, tower_key(self.engine.tower), self._classes_version, self.text_path

    def _remember(self, key, feats: torch.Tensor) -> torch.Tensor:
        snapshot = tuple(t.detach().clone() for t in self._learned_tensors())
        self._text_cache = (key, feats.detach(), snapshot)
        return self._text_cache[1]

    def _cache_hit(self, key) -> bool:
        cache = self._text_cache
        if cache is None or cache[0] != key:
            return False
        learned = self._learned_tensors()
        return len(learned) == len(cache[2]) and all(torch.equal(t.detach(), s) for t, s in zip(learned, cache[2]))

    def text_features(self) -> torch.Tensor:
        """Text features of the current class list (cached until what they depend on changes)."""
        if self._use_cache():
            key = self._cache_key()
            if self._cache_hit(key):
                return self._text_cache[1]
            return self._remember(key, self._compute_text_features())
        self._text_cache = None
        return self._compute_text_features()


def _tensor_key(t: torch.Tensor) -> tuple:
    return t._version, t.data_ptr(), t.dtype, t.device


def tower_key(tower) -> tuple:
    """Versions, addresses, dtypes and devices of the text tower's weights: ``load_state_dict``, ``copy_``,
    ``.to()`` or a swapped weight change it; ``.data`` writes do not (see :meth:`PromptModule.clear_cache`)."""
    tensors = [*tower.token_embedding.parameters(), *tower.transformer.parameters(), *tower.ln_final.parameters(),
               tower.positional_embedding]
    proj = tower.text_projection
    if isinstance(proj, nn.Module):
        tensors.extend(proj.parameters())
    elif proj is not None:
        tensors.append(proj)
    return tuple(_tensor_key(t) for t in tensors)
