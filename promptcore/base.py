"""What every promptcore method module shares: the frozen CLIP model, the text engine, image
checks, cosine scoring, the eval-mode text cache and promptcore's own prompt files."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from promptcore.kernels import cosine_logits

from .checkpoints import CheckpointError, read_prompt_file, save_prompt_file
from .engine import PromptSet, TextEngine
from .models import image_size
from .official import LearnerSpec
from .prompts import clean_classnames, context_prompts, default_tokenizer
from .views import require_finite


class PromptModule(nn.Module):
    """Base class of the method modules (CoOp, ...). Subclasses define ``method``,
    ``options()`` and ``_compute_text_features()``."""

    method: str = ""

    def __init__(self, model: nn.Module, tokenizer=None, text_path: str = "auto", freeze: bool = True,
                 capture: str = "none"):
        super().__init__()
        if not hasattr(model, "encode_image") or not hasattr(model, "logit_scale"):
            raise TypeError(f"{type(model).__name__} is not an open_clip CLIP model (no encode_image / logit_scale)")
        engine = TextEngine(model, capture=capture)
        engine.resolve_path(text_path)
        self.model = model
        self.engine = engine
        self.text_path = text_path
        self.tokenizer = tokenizer if tokenizer is not None else default_tokenizer(engine.tower.context_length)
        self.model_name: Optional[str] = None
        self._text_cache = None
        self._classes_version = 0
        self._freeze = freeze

    def _finish_init(self) -> None:
        """Freeze CLIP (as the official trainers do) once every argument has been validated."""
        if self._freeze:
            for p in self.model.parameters():
                p.requires_grad_(False)

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

    # -- class list ----------------------------------------------------------------------------

    def _install_prompts(self, classnames: Sequence[str], class_token_position: str = "end",
                         ctx_layout: str = "shared", names: Optional[List[str]] = None) -> None:
        """Build the prompt set of ``classnames`` around the learned context and make it current.

        Needs ``n_ctx`` and ``prompt_prefix`` set; raises before changing anything on bad names.
        ``names``: ``clean_classnames(classnames)`` when the caller has already validated them.
        """
        if names is None:
            names = clean_classnames(classnames)
        tower = self.engine.tower
        built = context_prompts(self.tokenizer, names, self.n_ctx, self.prompt_prefix, tower.context_length,
                                class_token_position, raw_names=list(classnames))
        self.prompt_learner.prompts = PromptSet(tower, built.ids, built.slots, ctx_layout)
        self.classnames = list(classnames)
        self.name_lens = built.name_lens
        self._classes_version += 1
        self.clear_cache()

    @property
    def tokenized_prompts(self) -> torch.Tensor:
        """Token ids (n_cls, context_length) of the prompts as fed to the tower."""
        return self.prompt_learner.prompts.ids

    # -- text features and their cache ------------------------------------------------------

    def _cache_key(self):
        params = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in self.prompt_learner.parameters())
        return params, self._classes_version, self.text_path

    def text_features(self) -> torch.Tensor:
        """Text features of the current class list (cached in eval mode until the prompts change)."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.prompt_learner.parameters())
        if not self.training and not needs_grad:
            key = self._cache_key()
            if self._text_cache is not None and self._text_cache[0] == key:
                return self._text_cache[1]
            feats = self._compute_text_features()
            self._text_cache = (key, feats.detach())
            return self._text_cache[1]
        self._text_cache = None
        return self._compute_text_features()

    def clear_cache(self) -> None:
        """Forget cached text features."""
        self._text_cache = None

    def _compute_text_features(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def options(self) -> Dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- promptcore files -------------------------------------------------------------------

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
