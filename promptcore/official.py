"""Official checkpoints, adapted to promptcore's prompt learners: the one place that reads them.

:func:`read_official` reads a Dassl ``model.pth.tar-N`` / ``model-best.pth.tar`` (file or folder;
through :func:`promptcore.checkpoints.read_torch_checkpoint`, which runs no pickled code), finds the
prompt learner's state and adapts it to the method it holds:

* CoOp (KaiyangZhou/CoOp): ``ctx`` is learned;
* CoCoOp (same repo): ``ctx`` and ``meta_net.*``; anything else is ignored (the official
  ``load_state_dict(strict=False)``);
* MaPLe (muzairkhattak/multimodal-prompt-learning): the file holds the whole ``CustomCLIP``;
  ``prompt_learner.*`` is learned and every other tensor is a CLIP weight to check against the model.

``token_prefix`` / ``token_suffix`` (the embeddings of the training prompts) are never loaded, as the
official ``load_model`` drops them; they are kept on the result for checks (the export's class check,
MaPLe's start-of-text check).

:class:`LearnerSpec` describes the tensors a module's prompt learner holds, each expected shape once:
every missing-key, unexpected-key and shape message of every loader comes from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .checkpoints import (
    CheckpointError,
    check_learned_tensor,
    read_prompt_file,
    read_torch_checkpoint,
    resolve_checkpoint,
)

METHOD_NAMES = {"coop": "CoOp", "cocoop": "CoCoOp", "maple": "MaPLe", "tpt": "TPT"}
# Saved by the official prompt learners (embeddings of the training prompts) and dropped on load, as officially.
FIXED_TOKEN_KEYS = ("token_prefix", "token_suffix")


# -- what each method's official file holds ------------------------------------------------------


@dataclass(frozen=True)
class _Adaptation:
    learned: Callable[[str], bool]  # which prompt-learner keys are learned tensors
    strict: bool  # refuse learned keys the module lacks (False: ignored, as the official loader does)


_ADAPTATIONS = {
    "coop": _Adaptation(lambda key: key == "ctx", strict=True),
    "cocoop": _Adaptation(lambda key: key == "ctx" or key.startswith("meta_net."), strict=False),
    "maple": _Adaptation(lambda key: True, strict=True),
}


def detect_method(state: Mapping[str, Any]) -> str:
    """Which method's prompt learner a state dict belongs to ("coop", "cocoop", "maple" or "unknown")."""
    keys = set(state)
    if any(k.startswith(("compound_prompts_text", "compound_prompt_projections")) for k in keys) \
            or "proj.weight" in keys:
        return "maple"
    if any(k.startswith("meta_net.") for k in keys):
        return "cocoop"
    if "ctx" in keys:
        return "coop"
    return "unknown"


def check_method(state: Mapping[str, Any], expected: Union[str, Sequence[str]], source) -> str:
    """The method ``state`` belongs to; a clear error when it is none of ``expected``."""
    accepted = (expected,) if isinstance(expected, str) else tuple(expected)
    found = detect_method(state)
    if found == "unknown":
        raise CheckpointError(f"{source} holds no prompt-learner context ('ctx'); keys: {sorted(state)[:8]}")
    if found not in accepted:
        wanted = " or ".join(METHOD_NAMES[m] for m in accepted)
        raise CheckpointError(f"{source} holds {METHOD_NAMES[found]} prompts, not {wanted}; "
                              f"load it with promptcore.{METHOD_NAMES[found]}")
    return found


def layout_of(method: str, shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, object]:
    """The constructor options a prompt learner's tensor shapes imply (``n_ctx``, CoOp's ``csc``, MaPLe's ``depth``)."""
    ctx = shapes.get("ctx")
    if ctx is None or len(ctx) < 2:
        return {}
    layout: Dict[str, object] = {"n_ctx": int(ctx[-2])}
    if method == "coop":
        layout["csc"] = len(ctx) == 3
    if method == "maple":
        layout["depth"] = 1 + len([k for k in shapes if k.startswith("compound_prompts_text.")])
    return layout


def _shapes(state: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


# -- the result of reading a file --------------------------------------------------------------------


@dataclass
class OfficialCheckpoint:
    """An official checkpoint adapted to one method's prompt learner.

    ``learner``: the learned tensors, keyed as promptcore's prompt learner (and the official one) names
    them; ``strict``: whether learned keys the module lacks are refused; ``clip``: CLIP tensors saved beside
    the prompts (MaPLe's whole-model files; official ``CustomCLIP`` names) to check against the model;
    ``token_prefix`` / ``token_suffix``: the training prompts' embeddings (never loaded); ``epoch`` and
    ``val_result`` as saved; ``file``: the file read (the newest one when a folder was given).
    """

    method: str
    learner: Dict[str, torch.Tensor]
    file: Path
    strict: bool = True
    clip: Dict[str, torch.Tensor] = field(default_factory=dict)
    token_prefix: Optional[torch.Tensor] = None
    token_suffix: Optional[torch.Tensor] = None
    epoch: Any = None
    val_result: Any = None
    ignored: Tuple[str, ...] = ()

    def layout(self) -> Dict[str, object]:
        """``n_ctx`` (plus CoOp's ``csc``, MaPLe's ``depth``) as the learned tensors imply them."""
        return layout_of(self.method, _shapes(self.learner))

    def options(self) -> Dict[str, object]:
        """Constructor options that rebuild the module these prompts were trained in (for export and eval).

        A 4-token CoCoOp context is taken to come from the official init phrase "a photo of a".
        """
        options = self.layout()
        if self.method == "cocoop":
            options["ctx_init"] = "a photo of a" if options.get("n_ctx") == 4 else None
        return options

    def info(self) -> Dict[str, Any]:
        """What ``load_official`` returns: the file read and its epoch."""
        return {"file": str(self.file), "epoch": self.epoch}


def _prompt_learner_state(ckpt: Any, file: Path) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, Any]]:
    """(prompt-learner state, other tensors of a whole-model file, epoch / val_result) of a loaded file."""
    if isinstance(ckpt, dict) and "state_dict" in ckpt:
        state, meta = ckpt["state_dict"], {k: ckpt.get(k) for k in ("epoch", "val_result")}
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, meta = ckpt, {}
    else:
        raise CheckpointError(f"{file} holds no state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: state_dict is a {type(state).__name__}, not a mapping")
    odd = [k for k in state if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"{file}: state_dict has a key that is not a string ({type(odd[0]).__name__} "
                              f"{str(odd[0])[:40]}); a state dict maps parameter names to tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}  # DataParallel
    learner = {k[len("prompt_learner."):]: v for k, v in state.items() if k.startswith("prompt_learner.")}
    if not learner:
        return state, {}, meta
    return learner, {k: v for k, v in state.items() if not k.startswith("prompt_learner.")}, meta


def _adapt(state: Dict[str, Any], method: str, file: Path, clip: Optional[Dict[str, Any]] = None,
           meta: Optional[Dict[str, Any]] = None) -> OfficialCheckpoint:
    rule = _ADAPTATIONS[method]
    learner = {k: v for k, v in state.items() if k not in FIXED_TOKEN_KEYS and rule.learned(k)}
    ignored = tuple(sorted(k for k in state if k not in FIXED_TOKEN_KEYS and k not in learner))
    meta = meta or {}
    return OfficialCheckpoint(method, learner, file, strict=rule.strict,
                              clip=dict(clip or {}) if method == "maple" else {},
                              token_prefix=state.get("token_prefix"), token_suffix=state.get("token_suffix"),
                              epoch=meta.get("epoch"), val_result=meta.get("val_result"),
                              ignored=ignored)


Source = Union[str, Path, OfficialCheckpoint]


def read_official(source: Source, methods: Union[str, Sequence[str], None] = None) -> OfficialCheckpoint:
    """Read an official (Dassl) checkpoint file, or the newest one under a folder, adapted to its method.

    ``methods``: the method(s) the caller accepts; another method's file raises a :class:`CheckpointError`
    naming what it holds. An :class:`OfficialCheckpoint` already read is checked and returned as is.
    """
    if isinstance(source, OfficialCheckpoint):
        if methods is not None:
            check_method(source.learner, methods, source.file)
        return source
    file = resolve_checkpoint(source)
    state, clip, meta = _prompt_learner_state(read_torch_checkpoint(file), file)
    method = check_method(state, methods if methods is not None else tuple(_ADAPTATIONS), file)
    return _adapt(state, method, file, clip, meta)


def read_context_source(source: Source, methods: Union[str, Sequence[str]]) -> OfficialCheckpoint:
    """:func:`read_official`, or a promptcore ``.safetensors`` prompt file read the same way (TPT's init:
    the method is that of the prompts the file holds, e.g. a CoOp context)."""
    if isinstance(source, OfficialCheckpoint) or not str(source).endswith(".safetensors"):
        return read_official(source, methods)
    tensors, _ = read_prompt_file(source)
    file = Path(source)
    return _adapt(tensors, check_method(tensors, methods, file), file)


# -- one description of every learned tensor -------------------------------------------------------


def describe_shape(key: str, shape: Tuple[int, ...], generic_word: bool = False) -> str:
    """Words for a learned tensor's shape in error messages, one description per kind of tensor.

    Contexts (``ctx``, MaPLe's ``compound_prompts_text.j``): "n_ctx=4, width=512" (``generic_word``:
    "generic, n_ctx=..." where contexts may also be class-specific), "class-specific for 7 classes,
    n_ctx=..."; linear layers (meta-net, MaPLe's projections) by the sizes they map; anything else by
    its shape.
    """
    name = key.rsplit(".", 1)[-1]
    is_context = key == "ctx" or key.startswith("compound_prompts_text.")
    if is_context and len(shape) == 3:
        return f"class-specific for {shape[0]} classes, n_ctx={shape[1]}, width={shape[2]}"
    if is_context and len(shape) == 2:
        return f"{'generic, ' if generic_word else ''}n_ctx={shape[0]}, width={shape[1]}"
    sizes = {"meta_net.linear1": ("image feature dim", "hidden"), "meta_net.linear2": ("hidden", "width"),
             "proj": ("text width", "vision width"), "compound_prompt_projections": ("text width", "vision width")}
    layer = key[: -len(name) - 1] if "." in key else ""
    words = next((v for k, v in sizes.items() if layer == k or layer.startswith(f"{k}.")), None)
    if words is not None and name == "weight" and len(shape) == 2:
        return f"{words[0]} {shape[1]} -> {words[1]} {shape[0]}"
    if words is not None and name == "bias" and len(shape) == 1:
        return f"{words[1]} {shape[0]}"
    return f"shape {shape}"


def shape_mismatch(key: str, got: Tuple[int, ...], want: Tuple[int, ...], source, owner: str,
                   generic_word: bool = False) -> str:
    """The error message for a learned tensor of the wrong shape: what the file holds, what ``owner`` has."""
    what = f"meta-net {key}" if key.startswith("meta_net.") else key
    return (f"{source}: checkpoint {what} is {describe_shape(key, got, generic_word)}, "
            f"this {owner} has {describe_shape(key, want, generic_word)}")


def _options_words(options: Mapping[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _key_list(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} and {len(keys) - limit} more"


@dataclass(frozen=True)
class LearnerSpec:
    """The tensors a module's prompt learner holds: each key's expected shape, in the learner's order.

    ``layout`` holds the options those shapes imply (see :func:`layout_of`); a file of another layout gets
    a "build it with ..." hint. ``init_sets_n_ctx``: the module's init phrase fixes n_ctx (and turns csc
    off), so the hint adds ``ctx_init=None``. ``generic_word``: contexts may be class-specific (CoOp and
    TPT, which starts from CoOp files), so a shared one is called "generic".
    """

    owner: str
    method: str
    shapes: Dict[str, Tuple[int, ...]]
    generic_word: bool = False
    init_sets_n_ctx: bool = False

    @property
    def layout(self) -> Dict[str, object]:
        return layout_of(self.method, self.shapes)

    @classmethod
    def of(cls, module, shapes: Optional[Mapping[str, Tuple[int, ...]]] = None) -> "LearnerSpec":
        """The description of ``module``'s prompt learner (or of ``shapes``, the tensors it is about to hold)."""
        if shapes is None:
            shapes = {k: tuple(v.shape) for k, v in module.prompt_learner.state_dict().items()}
        init = module.options().get("ctx_init") if module.method != "maple" else None
        return cls(type(module).__name__, module.method, dict(shapes), generic_word=module.method in ("coop", "tpt"),
                   init_sets_n_ctx=bool(init))

    def _layout_difference(self, state: Mapping[str, Any]) -> Tuple[Dict[str, object], Dict[str, object]]:
        theirs, ours = layout_of(self.method, _shapes(state)), self.layout
        return ({k: v for k, v in theirs.items() if k in ours and ours[k] != v},
                {k: v for k, v in ours.items() if k in theirs and theirs[k] != v})

    def _build_hint(self, theirs: Dict[str, object]) -> str:
        options = dict(theirs)
        if self.init_sets_n_ctx and ("n_ctx" in options or options.get("csc")):
            options["ctx_init"] = None
        return f"build it with {_options_words(options)}"

    def _layout_hint(self, state: Mapping[str, Any]) -> str:
        """E.g. ' (the checkpoint has depth=2, this MaPLe has depth=3: build it with depth=2)'; '' when the
        file's prompts have this module's layout."""
        theirs, ours = self._layout_difference(state)
        if not theirs:
            return ""
        return (f" (the checkpoint has {_options_words(theirs)}, this {self.owner} has {_options_words(ours)}: "
                f"{self._build_hint(theirs)})")

    def missing_message(self, missing: Sequence[str], state: Mapping[str, Any], source) -> str:
        return f"{source} lacks {_key_list(missing)}{self._layout_hint(state)}"

    def unexpected_message(self, unexpected: Sequence[str], state: Mapping[str, Any], source) -> str:
        return f"{source} holds tensors this {self.owner} does not have: {_key_list(unexpected)}" \
               f"{self._layout_hint(state)}"

    def shape_message(self, key: str, got: Tuple[int, ...], state: Mapping[str, Any], source) -> str:
        message = shape_mismatch(key, got, self.shapes[key], source, self.owner, self.generic_word)
        return f"{message}{self._layout_hint(state)}"

    def check(self, state: Mapping[str, Any], source, strict: bool = True) -> Dict[str, torch.Tensor]:
        """The tensors of ``state`` this learner holds, after checking every key, dtype, value and shape.

        ``strict`` refuses tensors the learner lacks (e.g. a deeper MaPLe file: loading only the common
        part would be wrong); ``strict=False`` ignores them, as the official loaders do.
        """
        unexpected = sorted(set(state) - set(self.shapes))
        if strict and unexpected:
            raise CheckpointError(self.unexpected_message(unexpected, state, source))
        missing = [k for k in self.shapes if k not in state]
        if missing:
            raise CheckpointError(self.missing_message(missing, state, source))
        for key, want in self.shapes.items():
            value = state[key]
            check_learned_tensor(key, value, source)
            if tuple(value.shape) != tuple(want):
                raise CheckpointError(self.shape_message(key, tuple(value.shape), state, source))
        return {key: state[key] for key in self.shapes}


# -- CLIP weights saved beside the prompts (MaPLe) -----------------------------------------------------


def same_weights(saved: torch.Tensor, own: torch.Tensor) -> bool:
    """Equal exactly, or equal up to rounding to the coarser of the two dtypes (fp16 checkpoints of fp32 CLIP)."""
    a = saved.detach().to("cpu")
    b = own.detach().to("cpu")
    if not (a.is_floating_point() and b.is_floating_point()):
        return torch.equal(a, b.to(a.dtype))
    coarse = a.dtype if torch.finfo(a.dtype).eps >= torch.finfo(b.dtype).eps else b.dtype
    a32, b32 = a.float(), b.float()
    if torch.equal(a.to(coarse), b.to(coarse)):
        return True
    info = torch.finfo(coarse)
    # One unit of rounding in the coarse dtype (double rounding, e.g. fp32 -> fp16 -> bf16), subnormals included.
    allowed = info.eps * b32.abs() + info.smallest_normal * info.eps
    return bool(((a32 - b32).abs() <= allowed).all())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def check_clip_tensors(ckpt: OfficialCheckpoint, own: Mapping[str, torch.Tensor],
                       sos_embedding: Optional[torch.Tensor] = None) -> int:
    """Check the CLIP tensors saved beside the prompts against the model's (``own``, official names).

    Each must equal the model's exactly or up to fp16 rounding, and the file's ``token_prefix`` must be the
    model's start-of-text embedding ``sos_embedding``; otherwise the first differing key is named. Returns
    how many CLIP tensors were checked (0 for files that hold none).
    """
    saved, source = ckpt.clip, ckpt.file
    if not saved:
        return 0
    for key, value in saved.items():
        if key not in own:
            raise CheckpointError(f"{source}: CLIP weights differ from this model: the checkpoint holds {key}, "
                                  "which this model lacks (was it trained on another CLIP?)")
        target = own[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(target.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: CLIP weights differ from this model: {key} has shape {shape}, "
                                  f"the model's is {tuple(target.shape)}")
        if not same_weights(value, target):
            raise CheckpointError(f"{source}: CLIP weights differ from this model, first at {key} "
                                  f"(max abs difference {_max_diff(value, target):.3g}); load it into the CLIP "
                                  "the prompts were trained with")
    missing = [k for k in own if k not in saved]
    if missing:
        raise CheckpointError(f"{source}: CLIP weights differ from this model: the checkpoint lacks {missing[0]}")
    prefix = ckpt.token_prefix
    if sos_embedding is not None and isinstance(prefix, torch.Tensor) and prefix.dim() == 3 \
            and prefix.shape[-1] == sos_embedding.shape[-1]:
        if not all(same_weights(row, sos_embedding) for row in prefix[:, 0]):
            raise CheckpointError(f"{source}: CLIP weights differ from this model, first at "
                                  "prompt_learner.token_prefix (the start-of-text embedding)")
    return len(saved)

