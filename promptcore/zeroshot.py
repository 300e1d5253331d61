"""Zero-shot classifiers and prompt ensembles on the shared-prefix engine.

open_clip's ``build_zero_shot_classifier`` encodes every (class, template) prompt at full length:
ImageNet with the 80 OpenAI templates is 80,000 prompts of 77 tokens. Each template's words
before the class slot are the same for every class, so here every template is one group of the
engine with its own token prefix, encoded once, and each class runs only its EOT-truncated
suffix (class tokens, the template's tail, EOT). Templates with equal prefix lengths share an
encoder pass; passes hold at most ``max_prompts`` prompts, which bounds memory.

The classifier is open_clip's: each template's feature L2-normalised, averaged over templates,
normalised again (here accumulated in fp32).
"""

from __future__ import annotations

import string
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import CachedTextFeatures, PromptModule, tower_key
from .checkpoints import CheckpointError, check_learned_tensor, read_prompt_file, save_prompt_file
from .engine import PromptSet
from .prompts import PromptTooLongError, clean_classnames, tokenize

TEMPLATE_SETS = ("openai", "simple")
# Default prompts per encoder pass: a full 77-token prompt holds ~10x the activations of a suffix.
FAST_MAX_PROMPTS, NAIVE_MAX_PROMPTS = 8192, 1024
Template = Union[str, Callable[[str], str]]
# Stands in for the class name when a callable template is turned back into a format string.
_SENTINEL = "\x00promptcore-class\x00"


def template_set(name: str) -> List[Template]:
    """open_clip's ImageNet template set ``"openai"`` (80 templates) or ``"simple"`` (7)."""
    key = str(name).lower()
    if key not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; choose one of {', '.join(TEMPLATE_SETS)}, or pass a list "
                         "of templates (format strings with one '{}' or callables)")
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES if key == "openai" else SIMPLE_IMAGENET_TEMPLATES)


def read_templates(spec) -> Union[str, List[str]]:
    """A template set name ("openai", "simple") as is, or the templates of a file, one per line."""
    if str(spec).lower() in TEMPLATE_SETS:
        return str(spec).lower()
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"templates {str(spec)!r} is neither a template set ({', '.join(TEMPLATE_SETS)}) nor a file")
    with open(path, encoding="utf-8") as f:
        templates = [line.rstrip("\n") for line in f if line.strip()]
    if not templates:
        raise ValueError(f"{path} holds no templates")
    return templates


def describe_template(template: Template) -> str:
    if isinstance(template, str):
        return repr(template)
    return f"callable {getattr(template, '__qualname__', type(template).__name__)}"


def check_templates(templates) -> Tuple[Optional[str], List[Template]]:
    """(set name or None, list of templates); a clear error names the first bad template."""
    if isinstance(templates, str):
        return str(templates).lower(), template_set(templates)
    try:
        items = list(templates)
    except TypeError:
        raise TypeError(f"templates must be a template set name or a sequence of templates, "
                        f"got {type(templates).__name__}") from None
    if not items:
        raise ValueError("the template list is empty")
    for i, template in enumerate(items):
        if isinstance(template, str):
            _check_format_string(i, template)
        elif not callable(template):
            raise TypeError(f"template {i} ({template!r}) is neither a format string nor a callable")
    return None, items


def _check_format_string(index: int, template: str) -> None:
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"template {index} {template!r} is not a valid format string: {exc}") from None
    if len(fields) != 1:
        raise ValueError(f"template {index} {template!r} must hold exactly one '{{}}' class slot, it holds "
                         f"{len(fields)}")
    if fields[0] != ("", "", None):
        raise ValueError(f"template {index} {template!r}: the class slot must be a plain '{{}}'")


def render(index: int, template: Template, name: str) -> str:
    """The prompt of class ``name`` under one template (a clear error names a failing callable)."""
    if isinstance(template, str):
        return template.format(name)
    try:
        text = template(name)
    except Exception as exc:
        raise ValueError(f"template {index} ({describe_template(template)}) raised {type(exc).__name__} for class "
                         f"{name!r}: {exc}") from exc
    if not isinstance(text, str):
        raise TypeError(f"template {index} ({describe_template(template)}) returned {type(text).__name__} for class "
                        f"{name!r}, not a string")
    return text


def as_format_string(index: int, template: Template, names: Sequence[str]) -> str:
    """A format string equal to ``template`` on every class name (callables included), or a clear error."""
    if isinstance(template, str):
        return template
    try:
        probe = template(_SENTINEL)
    except Exception:
        probe = None
    if isinstance(probe, str) and probe.count(_SENTINEL) == 1:
        fmt = probe.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{}")
        if all(fmt.format(n) == render(index, template, n) for n in names):
            return fmt
    raise CheckpointError(f"template {index} ({describe_template(template)}) cannot be written as a format string "
                          "(it changes the class name): pass it as a format string to save or export")


class ZeroShot(CachedTextFeatures, PromptModule):
    """A zero-shot classifier (prompt ensemble) over an open_clip CLIP model.

    ``zs.text_features()`` is the (n_cls, E) classifier equal to open_clip's
    ``build_zero_shot_classifier(model, tokenizer, classnames, templates).T``; ``zs(images)`` gives
    ``logit_scale.exp()`` x cosine logits. The classifier is built without gradients (as open_clip
    builds it) and cached until the class list, the text path or the text tower's weights change (writes
    through ``.data`` to those weights move no version counter: call :meth:`clear_cache` after them).

    Args:
        model: an open_clip ``CLIP`` / ``CustomTextCLIP`` (non-causal towers use the full-prompt path).
        classnames: class names in label order, used verbatim as open_clip does (no ``_`` rule).
        templates: "openai" (80 templates), "simple" (7), or a sequence of format strings with one
            ``{}`` anywhere and/or callables ``name -> str``.
        tokenizer: open_clip tokenizer; the default CLIP BPE tokenizer when None.
        text_path: "auto" (fast where exact), "fast" or "naive" (full 77-token prompts).
        max_prompts: prompts per encoder pass (bounds memory on big builds); None: 8192 on the fast
            path, 1024 on the full-prompt path.
        progress: show a tqdm bar when a build takes more than a couple of seconds.
        capture: "none", "compile" or "cudagraphs" (CUDA only): run the fast text path under torch.compile
            or as replayed CUDA graphs, see :mod:`promptcore.capture`.
    """

    method = "zeroshot"

    def __init__(self, model: nn.Module, classnames: Sequence[str], templates="openai", tokenizer=None,
                 text_path: str = "auto", max_prompts: Optional[int] = None, progress: bool = True,
                 capture: str = "none"):
        # CLIP is left trainable-as-given: a zero-shot classifier learns nothing and freezes nothing.
        super().__init__(model, tokenizer, text_path, capture)
        if max_prompts is not None and (isinstance(max_prompts, bool) or not isinstance(max_prompts, int)
                                        or max_prompts < 1):
            raise ValueError(f"max_prompts must be a positive integer, got {max_prompts!r}")
        self.template_set_name, self.templates = check_templates(templates)
        self.max_prompts = max_prompts
        self.progress = progress
        self.set_classnames(classnames)

    # -- prompts ----------------------------------------------------------------------------

    def options(self) -> Dict[str, Any]:
        """The templates as saved in files and export metadata (a set name or format strings)."""
        if self.template_set_name is not None:
            return {"templates": self.template_set_name}
        return {"templates": [as_format_string(i, t, self.classnames) for i, t in enumerate(self.templates)]}

    def set_classnames(self, classnames: Sequence[str]) -> None:
        """Swap the class list; every prompt is built and checked first, so a bad name changes nothing."""
        clean_classnames(classnames)  # validation only: open_clip uses the names verbatim
        names = list(classnames)
        ids = self._tokenize(names)
        self._ids = ids
        self._plan = _plan_passes(ids, self.engine.tower, self.max_prompts or FAST_MAX_PROMPTS)
        self.classnames = names
        self._classes_version += 1
        self.clear_cache()

    def _tokenize(self, names: List[str]) -> torch.Tensor:
        """Token ids (T, C, L) of every (template, class) prompt; int32 to halve a big build's footprint."""
        from open_clip.tokenizer import SimpleTokenizer

        L = self.engine.tower.context_length
        out = torch.empty(len(self.templates), len(names), L, dtype=torch.int32)
        for i, template in enumerate(self.templates):
            texts = [render(i, template, n) for n in names]
            if isinstance(self.tokenizer, SimpleTokenizer) and getattr(self.tokenizer, "reduction_fn", None) is None:
                # one extra position shows truncation: it holds a token only when the prompt does not fit
                ids = self.tokenizer(texts, context_length=L + 1)
                over = (ids[:, L] != 0).nonzero()
                if len(over):
                    c = int(over[0, 0])
                    raise PromptTooLongError(f"class {names[c]!r} with template {i} ({describe_template(template)}) "
                                             f"gives the prompt {texts[c]!r}, longer than the context length {L}")
                ids = ids[:, :L]
            else:
                try:
                    ids = tokenize(self.tokenizer, texts, L)
                except PromptTooLongError as exc:
                    raise PromptTooLongError(f"template {i} ({describe_template(template)}): {exc}") from None
            out[i] = ids
        return out

    @property
    def tokenized_prompts(self) -> torch.Tensor:
        """Token ids (n_templates, n_cls, context_length) of every prompt."""
        return self._ids

    @property
    def live_tokens(self) -> Tuple[int, int]:
        """(tokens per layer over the whole build on the fast path, the same on the full-prompt path)."""
        fast = naive = 0
        for templates, classes in self._plan:
            ids = self._ids[templates][:, classes]
            f, n = PromptSet(self.engine.tower, ids, torch.full(ids.shape, -1)).live_tokens
            fast, naive = fast + f, naive + n
        return fast, naive

    # -- the classifier ---------------------------------------------------------------------

    def _cache_key(self):
        return tower_key(self.engine.tower), self._classes_version, self.text_path

    def _learned_tensors(self) -> Sequence[torch.Tensor]:
        return ()  # nothing learned; the tower's weights are keyed by version (see clear_cache)

    def _use_cache(self) -> bool:
        return True  # built without gradients, in any mode: only the class list, path or tower weights expire it

    def text_features(self) -> torch.Tensor:
        """The (n_cls, E) classifier, L2-normalised rows (cached; see the class docstring)."""
        return super().text_features()

    def _compute_text_features(self) -> torch.Tensor:
        return self.encode_text(self.text_path)

    def encode_text(self, path: str = "auto") -> torch.Tensor:
        """Build the classifier (n_cls, E) through ``path`` ("auto", "fast", "naive"), uncached."""
        from tqdm import tqdm

        tower = self.engine.tower
        plan = self._plan
        if self.engine.resolve_path(path) == "naive":
            plan = _plan_passes(self._ids, tower, self.max_prompts or NAIVE_MAX_PROMPTS)
        T, C, L = self._ids.shape
        total = torch.zeros(C, tower.output_dim, dtype=torch.float32, device=tower.device)
        with torch.no_grad(), tqdm(total=T * C, unit="prompt", desc="zero-shot classifier", delay=2.0,
                                   disable=not self.progress, leave=False) as bar:
            for templates, classes in plan:
                ids = self._ids[templates][:, classes]
                prompts = PromptSet(tower, ids, torch.full(ids.shape, -1))
                feats = self.engine.encode(prompts, path=path)  # (G, C_chunk, E)
                total[classes] += F.normalize(feats.float(), dim=-1).sum(dim=0)
                bar.update(ids.shape[0] * ids.shape[1])
        return F.normalize(total / T, dim=-1).to(tower.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_cls) for images (B, 3, H, W)."""
        return self.logits(self.encode_images(images), self.text_features())

    # -- files ------------------------------------------------------------------------------

    def save(self, path, model_name: Optional[str] = None):
        """Write the classifier (fp32), class names and templates to a safetensors file, atomically."""
        options = self.options()  # refuses an inexpressible callable before anything is written
        classifier = self.text_features().float()
        return save_prompt_file(path, {"classifier": classifier}, self.method, options, self.classnames,
                                model_name or self.model_name)

    def load(self, path) -> Dict[str, Any]:
        """Use the classifier saved in ``path`` (same class names and templates) until the model changes."""
        tensors, meta = read_prompt_file(path)
        if meta["method"] != self.method:
            raise CheckpointError(f"{path} holds {meta['method']} prompts, this module is {self.method}")
        if list(meta["classnames"]) != list(self.classnames):
            raise CheckpointError(f"{path} was built for other class names ({len(meta['classnames'])} classes, "
                                  f"this ZeroShot has {len(self.classnames)})")
        if meta["options"].get("templates") != self.options()["templates"]:
            raise CheckpointError(f"{path} was built with other templates")
        extra = sorted(set(tensors) - {"classifier"})
        if extra or "classifier" not in tensors:
            raise CheckpointError(f"{path} must hold exactly one tensor 'classifier', it holds {sorted(tensors)}")
        classifier = tensors["classifier"]
        check_learned_tensor("classifier", classifier, path)
        want = (len(self.classnames), self.engine.tower.output_dim)
        if tuple(classifier.shape) != want:
            raise CheckpointError(f"{path}: classifier has shape {tuple(classifier.shape)}, this model needs {want}")
        tower = self.engine.tower
        self._remember(self._cache_key(), classifier.to(device=tower.device, dtype=tower.dtype))
        return meta

    @classmethod
    def from_file(cls, path, model: nn.Module, tokenizer=None, use_saved: bool = True, **overrides):
        """The ZeroShot a file describes; its saved classifier is used unless ``use_saved=False``
        (then it is rebuilt from the templates, e.g. to check an export against this model)."""
        _, meta = read_prompt_file(path)
        if meta["method"] != cls.method:
            raise CheckpointError(f"{path} holds {meta['method']} prompts, not {cls.method}")
        options = {**meta["options"], **overrides}
        classnames = options.pop("classnames", None) or meta["classnames"]
        module = cls(model, classnames, tokenizer=tokenizer, **options)
        module.model_name = meta["model_name"]
        if use_saved:
            module.load(path)
        return module


def _plan_passes(ids: torch.Tensor, tower, max_prompts: int) -> List[Tuple[torch.Tensor, slice]]:
    """Encoder passes: (template indices, class slice), templates of one prefix length together.

    A template's prefix length is where its prompts first differ over the classes; putting templates
    of equal prefix length in one pass wastes no prefix token. At most ``max_prompts`` prompts per pass.
    """
    T, C, L = ids.shape
    ids = ids.long()
    eot = tower.pool_positions(ids.reshape(-1, L)).reshape(T, C)
    same = (ids == ids[:, :1]).all(dim=1)  # (T, L)
    first_diff = torch.where(same.all(dim=1), torch.full((T,), L), (~same).int().argmax(dim=1))
    prefix = torch.minimum(first_diff, eot.amin(dim=1)).tolist()
    tail = eot.amax(dim=1).tolist()
    by_prefix: Dict[int, List[int]] = defaultdict(list)
    for t in sorted(range(T), key=lambda t: (prefix[t], tail[t], t)):
        by_prefix[prefix[t]].append(t)
    per_class_chunk = min(C, max_prompts)
    per_template_chunk = max(1, max_prompts // per_class_chunk)
    plan = []
    for members in by_prefix.values():
        for start in range(0, C, per_class_chunk):
            classes = slice(start, min(C, start + per_class_chunk))
            for t0 in range(0, len(members), per_template_chunk):
                plan.append((torch.tensor(members[t0:t0 + per_template_chunk]), classes))
    return plan
