"""Prompt construction shared by the methods: tokenization, context slots, class positions.

Prompt strings follow the official prompt learners: ``prefix_phrase + " " + name + "."`` with
``name.replace("_", " ")`` and ``prefix_phrase`` the init phrase or ``"X " * n_ctx``; the
first ``n_ctx`` tokens after SOS are the learned context.
"""

from __future__ import annotations

import math
import numbers
import unicodedata
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")


class PromptTooLongError(ValueError):
    """A prompt does not fit the tower's context length."""


def default_tokenizer(context_length: int = 77):
    """open_clip's CLIP BPE tokenizer (shipped with open_clip, no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def clean_classnames(classnames: Sequence[str]) -> List[str]:
    """Validate a class list and apply the official ``_`` -> space rule."""
    if isinstance(classnames, str):
        raise TypeError("classnames must be a sequence of names, not one string")
    names = list(classnames)
    if not names:
        raise ValueError("the class list is empty")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class {i} has an empty or non-string name: {name!r}")
        bad = next((ch for ch in name if unicodedata.category(ch) == "Cc"), None)
        if bad is not None:
            raise ValueError(f"class {i} name {name!r} holds the control character {bad!r}; class names are "
                             "single lines of printable text")
    return [name.replace("_", " ") for name in names]


def count_tokens(tokenizer, text: str) -> int:
    """BPE tokens of ``text`` without SOS/EOT."""
    if hasattr(tokenizer, "encode"):
        return len(tokenizer.encode(text))
    ids = tokenizer([text], context_length=1024)[0] if _accepts_context(tokenizer) else tokenizer([text])[0]
    return int((ids != 0).sum()) - 2


def _accepts_context(tokenizer) -> bool:
    try:
        tokenizer(["a"], context_length=8)
    except TypeError:
        return False
    return True


def tokenize(tokenizer, texts: Sequence[str], context_length: int, names: Optional[Sequence[str]] = None):
    """Token ids (N, context_length); a clear error names any text that would be truncated."""
    for i, text in enumerate(texts):
        needed = count_tokens(tokenizer, text) + 2
        if needed > context_length:
            who = f"class name {names[i]!r}" if names is not None else f"prompt {text!r}"
            raise PromptTooLongError(
                f"{who} needs {needed} tokens in the prompt {text!r}, more than the context length {context_length}"
            )
    try:
        ids = tokenizer(list(texts), context_length=context_length)
    except TypeError:
        ids = tokenizer(list(texts))
    if ids.shape[1] != context_length:
        raise ValueError(f"tokenizer returned {ids.shape[1]} positions, the tower expects {context_length}")
    return ids.long()


@dataclass
class ContextPrompts:
    """Ids and context slots of one prompt per class (see :class:`promptcore.engine.PromptSet`)."""

    ids: torch.Tensor  # (C, L)
    slots: torch.Tensor  # (C, L): -1 fixed token, k >= 0 context row k
    name_lens: List[int]
    prompt_prefix: str
    n_ctx: int


def context_prompts(
    tokenizer,
    classnames: Sequence[str],
    n_ctx: int,
    prompt_prefix: str,
    context_length: int,
    class_token_position: str = "end",
    raw_names: Optional[Sequence[str]] = None,
) -> ContextPrompts:
    """Build the official prompts ``[SOS] ctx name . [EOT]`` with ctx moved for middle/front.

    ``classnames`` are already cleaned; ``prompt_prefix`` is the phrase whose first ``n_ctx``
    tokens are context slots.
    """
    if class_token_position not in CLASS_TOKEN_POSITIONS:
        raise ValueError(f"unknown class token position {class_token_position!r}; "
                         f"choose one of {', '.join(CLASS_TOKEN_POSITIONS)}")
    texts = [f"{prompt_prefix} {name}." for name in classnames]
    ids = tokenize(tokenizer, texts, context_length, raw_names or classnames)
    name_lens = [count_tokens(tokenizer, name) for name in classnames]
    C, L = ids.shape
    slots = torch.full((C, L), -1, dtype=torch.long)
    slots[:, 1:1 + n_ctx] = torch.arange(n_ctx)
    if class_token_position == "end":
        return ContextPrompts(ids, slots, name_lens, prompt_prefix, n_ctx)
    order = torch.arange(L).repeat(C, 1)
    half = n_ctx // 2
    for c, name_len in enumerate(name_lens):
        ctx_pos = list(range(1, 1 + n_ctx))
        name_pos = list(range(1 + n_ctx, 1 + n_ctx + name_len))
        rest = list(range(1 + n_ctx + name_len, L))
        if class_token_position == "middle":
            new = [0] + ctx_pos[:half] + name_pos + ctx_pos[half:] + rest
        else:
            new = [0] + name_pos + ctx_pos + rest
        order[c] = torch.tensor(new)
    ids = ids.gather(1, order)
    slots = slots.gather(1, order)
    return ContextPrompts(ids, slots, name_lens, prompt_prefix, n_ctx)


def init_context(tower, tokenizer, ctx_init: Optional[str], n_ctx: int, shape_lead: Sequence[int] = (),
                 std: float = 0.02, generator: Optional[torch.Generator] = None):
    """Initial context vectors and the prompt phrase, as the official prompt learners make them.

    With ``ctx_init`` the context is the embedding of the phrase's first ``n_ctx`` tokens, where
    ``n_ctx`` becomes the phrase's word count; otherwise N(0, std) with phrase ``"X X ... X"``.
    Returns (ctx, n_ctx, prompt_prefix).
    """
    dtype = tower.dtype
    if ctx_init:
        phrase = init_phrase(ctx_init)
        n_ctx = len(phrase.split(" "))
        phrase_tokens = count_tokens(tokenizer, phrase)
        check_context_budget(phrase_tokens, tower.context_length, f"ctx_init={phrase!r}")
        if phrase_tokens < n_ctx:  # a word the tokenizer drops: the last slots would land on the class name
            raise ValueError(f"ctx_init={phrase!r} has {n_ctx} words but only {phrase_tokens} tokens; "
                             "each word must give at least one token")
        ids = tokenize(tokenizer, [phrase], tower.context_length)
        with torch.no_grad():
            emb = tower.token_embedding(ids.to(tower.device)).to(dtype)
        return emb[0, 1:1 + n_ctx].clone(), n_ctx, phrase
    check_n_ctx(n_ctx, tower.context_length)
    ctx = torch.empty(*shape_lead, n_ctx, tower.width, dtype=torch.float32)
    torch.nn.init.normal_(ctx, std=std, generator=generator)
    return ctx.to(device=tower.device, dtype=dtype), n_ctx, " ".join(["X"] * n_ctx)


# The fewest tokens a prompt needs besides its context: SOS, one class-name token, ".", EOT.
PROMPT_OVERHEAD = 4


def init_phrase(ctx_init) -> str:
    """The init phrase of ``ctx_init`` (``_`` -> space, as officially), whitespace runs made one space:
    each word is one context slot, so an empty word would shift the slots onto the class name."""
    if not isinstance(ctx_init, str):
        raise ValueError(f"ctx_init must be a phrase (a string) or None, got {type(ctx_init).__name__} {ctx_init!r}")
    bad = next((ch for ch in ctx_init if unicodedata.category(ch) == "Cc" and not ch.isspace()), None)
    if bad is not None:
        raise ValueError(f"ctx_init {ctx_init!r} holds the control character {bad!r}")
    phrase = " ".join(ctx_init.replace("_", " ").split())
    if not phrase:
        raise ValueError(f"ctx_init {ctx_init!r} holds no word; pass a phrase such as 'a photo of a', or None for a "
                         "random context")
    return phrase


def check_context_budget(context_tokens: int, context_length: int, what: str) -> None:
    """Raise unless ``context_tokens`` of context leave room for a class name in the tower's context."""
    if context_tokens + PROMPT_OVERHEAD > context_length:
        raise ValueError(f"{what} takes {context_tokens} tokens and leaves no room for class names in the "
                         f"{context_length}-token context (at most {context_length - PROMPT_OVERHEAD} context tokens)")


def check_n_ctx(n_ctx, context_length: int) -> int:
    """``n_ctx`` if it is an integer >= 1 that leaves room for class names, else a ValueError naming it."""
    n_ctx = check_integer("n_ctx", n_ctx, 1)
    check_context_budget(n_ctx, context_length, f"n_ctx={n_ctx}")
    return n_ctx


def check_integer(name: str, value, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_number(name: str, value, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool), > 0 with ``positive`` else >= 0;
    otherwise a ValueError naming ``name``."""
    bound = "> 0" if positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number {bound}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def check_flag(name: str, value) -> bool:
    """``value`` if it is a bool, else a ValueError naming ``name`` (0, 1 or "no" are not flags)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_seed(seed) -> None:
    """Raise unless ``seed`` is None or an integer (not a bool)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise ValueError(f"seed must be an integer or None, got {type(seed).__name__} {seed!r}")


def check_context_options(n_ctx, ctx_init) -> None:
    """Type checks of the context options every prompt learner takes, before anything is built: ``n_ctx``
    an integer >= 1 (checked even where an init phrase overrides it), ``ctx_init`` None, "" (no phrase, as
    officially) or a phrase with at least one word."""
    check_integer("n_ctx", n_ctx, 1)
    if ctx_init is not None:
        if not isinstance(ctx_init, str):
            raise ValueError(f"ctx_init must be a phrase (a string) or None, got {type(ctx_init).__name__} "
                             f"{ctx_init!r}")
        if ctx_init:
            init_phrase(ctx_init)
