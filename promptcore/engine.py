"""The text-encoding engine: full-length (naive) and shared-prefix, EOT-truncated (fast) paths.

A prompt set is C token sequences (one per class) whose positions are either fixed tokens or
slots of a learned context. In a causal tower the hidden state of position i depends only on
positions 0..i, and the feature is read at the EOT token, so:

* positions after the last EOT are never computed (EOT truncation);
* the first P positions, identical for every class, are encoded once per group; each class's
  suffix (positions P .. EOT) attends to the prefix's keys/values plus its own (prefix sharing).

A *group* is one copy of the prefix: one for CoOp, one per image for CoCoOp and TPT, one per
template for zero-shot classifiers (whose groups differ in their tokens, not only in context). The naive
path assembles full ``context_length`` prompts and runs open_clip's own blocks, as the official
code does; it is the test oracle, the benchmark baseline and the fallback for towers where the
shortcut is not exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from promptcore.kernels import assemble_prompts
from promptcore.kernels.backend import tracing_or_compiling

from .capture import CapturedPath
from .tower import TextTower

PATHS = ("auto", "fast", "naive")
_reported_fallbacks: set = set()


@dataclass(frozen=True)
class Bucket:
    """Classes whose suffixes are padded to one length on the fast path.

    ``index`` locates the bucket's class indices in :attr:`PromptSet.bucket_members`; ``size`` is how
    many classes it holds, ``length`` their padded suffix length, ``has_ctx`` whether a context slot
    falls inside those suffixes.
    """

    index: int
    size: int
    length: int
    has_ctx: bool


class BufferList(nn.Module):
    """Tensors kept as non-persistent buffers (``.to()`` moves them, state dicts leave them out),
    read back by position."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t, persistent=False)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self._buffers[str(i)]

    def __len__(self) -> int:
        return len(self._buffers)


@dataclass(frozen=True)
class SuffixState:
    """One length bucket's suffixes between blocks of the fast path.

    ``x``: hidden states (G, C_b, S_b, D), or (1, C_b, S_b, D) shared by every group while
    ``grouped`` is False (before the first block, when nothing per group reached them yet);
    ``lens`` (C_b,) live suffix lengths; ``eot`` the EOT row of each suffix, (C_b,) or per group (G, C_b).
    """

    x: torch.Tensor
    lens: torch.Tensor
    eot: torch.Tensor
    grouped: bool

    def after(self, x: torch.Tensor) -> "SuffixState":
        """The state after a block: having attended to its group's prefix, every suffix is per group."""
        return SuffixState(x, self.lens, self.eot, True)


class PromptSet(nn.Module):
    """Token ids and context slots of C prompts, with their prefix/suffix split.

    ``ids`` (C, L) are the token ids as fed to the tower (placeholders at context slots),
    ``slots`` (C, L) hold -1 for a fixed token or the context row k that fills the position.
    ``ctx_layout`` says whether context rows are shared by all classes ("shared" or "group",
    one copy per group) or class-specific ("class"); class-specific rows end the shared prefix.

    ``ids`` and ``slots`` may also be (G, C, L): G groups, each with its own fixed tokens (no
    context), e.g. one zero-shot template per group. Each group's prefix is its own tokens before
    the first column where its classes differ; the set's ``prefix_len`` is the shortest of them,
    and a longer group's remaining prefix tokens are encoded in its suffixes (exact, only slower:
    callers put groups of equal prefix length together).
    """

    def __init__(self, tower: TextTower, ids: torch.Tensor, slots: torch.Tensor, ctx_layout: str = "shared",
                 max_buckets: int = 4):
        super().__init__()
        if ids.dim() not in (2, 3) or ids.shape != slots.shape:
            raise ValueError(f"ids and slots must both be (C, L) or (G, C, L), got {tuple(ids.shape)} and "
                             f"{tuple(slots.shape)}")
        if ids.shape[-2] == 0:
            raise ValueError("a prompt set needs at least one class")
        per_group = ids.dim() == 3
        if per_group:
            if ids.shape[0] == 0:
                raise ValueError("a per-group prompt set needs at least one group")
            if ctx_layout != "shared" or bool((slots >= 0).any()):
                raise ValueError("per-group token ids (G, C, L) hold fixed tokens only: no context slots")
        device = tower.device
        ids = ids.to(device=device, dtype=torch.long)
        slots = slots.to(device=device, dtype=torch.long)
        L = ids.shape[-1]
        eot = tower.pool_positions(ids.reshape(-1, L)).reshape(ids.shape[:-1])
        # Per-group sets: a column belongs to the shared prefix when, inside every group, all classes
        # agree there (the groups' prefixes may differ in content, not in length).
        ids3 = ids if per_group else ids.unsqueeze(0)
        slots3 = slots if per_group else slots.unsqueeze(0)
        same = (ids3 == ids3[:, :1]).all(dim=1).all(dim=0) & (slots3 == slots3[:, :1]).all(dim=1).all(dim=0)
        if ctx_layout == "class":
            same &= slots3[0, 0] < 0
        not_same = (~same).nonzero()
        prefix_len = int(not_same[0, 0]) if len(not_same) else L
        prefix_len = max(0, min(prefix_len, int(eot.min())))
        self.ctx_layout = ctx_layout
        self.per_group = per_group
        self.prefix_len = prefix_len
        self.suffix_len = int(eot.max()) + 1 - prefix_len
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("slots", slots, persistent=False)
        self.register_buffer("eot", eot, persistent=False)
        self._keep = prefix_len + self.suffix_len
        self._embeds_key = None
        self.register_buffer("token_embeds", self._gather(tower), persistent=False)
        self._embeds_key = _weight_key(tower.token_embedding.weight)
        # Which positions hold context, decided once here as Python values: the encoders branch on
        # them, and a data-dependent branch cannot be traced for export.
        is_ctx = (slots >= 0).cpu()
        self._ctx_columns = is_ctx.reshape(-1, L).any(dim=0).tolist()
        # a class's suffix is as long as its longest prompt over the groups
        class_eot = eot.amax(dim=0) if per_group else eot
        split = length_buckets((class_eot - prefix_len + 1).tolist(), max_buckets)
        self.buckets: Tuple[Bucket, ...] = tuple(
            Bucket(i, len(members), length,
                   False if per_group else bool(is_ctx[members, prefix_len:prefix_len + length].any()))
            for i, (members, length) in enumerate(split))
        members = [torch.tensor(m, dtype=torch.long, device=device) for m, _ in split]
        self.bucket_members = BufferList(members)  # class indices of bucket i, on the prompts' device
        # output row -> position in the buckets' concatenation: restores class order
        self.register_buffer("bucket_order", torch.argsort(torch.cat(members)), persistent=False)

    def _gather(self, tower: TextTower) -> torch.Tensor:
        with torch.no_grad():
            return tower.token_embedding(self.ids[..., :self._keep])

    def refresh_token_embeds(self, tower: TextTower, force: bool = False) -> None:
        """Re-gather ``token_embeds`` when the tower's token-embedding weight changed (another tensor, an
        in-place write, another device or dtype), or always with ``force`` (writes through ``.data``,
        which no version counter sees). In place where the shape, dtype and device allow, so a captured
        path (compiled or CUDA graphs) keeps reading the same buffer."""
        weight = tower.token_embedding.weight
        key = _weight_key(weight)
        if not force and key == self._embeds_key:
            return
        fresh = self._gather(tower)
        old = self.token_embeds
        if old.shape == fresh.shape and old.dtype == fresh.dtype and old.device == fresh.device:
            old.copy_(fresh)
        else:
            self.token_embeds = fresh
        self._embeds_key = key

    @property
    def num_classes(self) -> int:
        return self.ids.shape[-2]

    @property
    def num_groups(self) -> int:
        """Groups with their own tokens (G of per-group ids); 1 when every group shares the tokens."""
        return self.ids.shape[0] if self.per_group else 1

    @property
    def live_tokens(self) -> Tuple[int, int]:
        """(tokens per layer on the fast path, tokens per layer on the naive path), for one group of
        shared tokens or for all G groups of per-group tokens."""
        suffix = sum(b.size * b.length for b in self.buckets)
        G = self.num_groups
        return G * (self.prefix_len + suffix), G * self.num_classes * self.ids.shape[-1]

    def members(self, bucket: Bucket) -> torch.Tensor:
        """Class indices (C_b,) of a length bucket, on the prompts' device."""
        return self.bucket_members[bucket.index]

    def has_ctx(self, start: int, stop: int) -> bool:
        """Whether any prompt has a context slot in positions [start, stop)."""
        return any(self._ctx_columns[start:stop])


def length_buckets(lengths: Sequence[int], max_buckets: int = 4) -> List[Tuple[List[int], int]]:
    """Split classes into at most ``max_buckets`` groups of similar suffix length.

    Every class of a bucket is padded to the bucket's longest suffix, so the split that minimises
    the padded token count (sum of size x longest length) is chosen by dynamic programming over
    the sorted distinct lengths. Returns [(class indices, padded length)], shortest first.
    """
    if max_buckets < 1:
        raise ValueError("max_buckets must be at least 1")
    distinct = sorted(set(lengths))
    counts = [sum(1 for x in lengths if x == d) for d in distinct]
    n = len(distinct)
    prefix_counts = [0]
    for c in counts:
        prefix_counts.append(prefix_counts[-1] + c)
    inf = float("inf")
    # cost[k][j]: best padded tokens covering distinct[:j] with k buckets; the last bucket ends at j-1
    cost = [[inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    cost[0][0] = 0
    for k in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            for i in range(j):
                if cost[k - 1][i] == inf:
                    continue
                c = cost[k - 1][i] + (prefix_counts[j] - prefix_counts[i]) * distinct[j - 1]
                if c < cost[k][j]:
                    cost[k][j], cut[k][j] = c, i
    k = min(range(1, max_buckets + 1), key=lambda kk: (cost[kk][n], kk))
    bounds = []
    j = n
    while k > 0 and j > 0:
        i = cut[k][j]
        bounds.append((distinct[i], distinct[j - 1]))
        j, k = i, k - 1
    buckets = []
    for low, high in reversed(bounds):
        members = [c for c, x in enumerate(lengths) if low <= x <= high]
        buckets.append((members, high))
    return buckets


@dataclass
class LayerPrompts:
    """Values that overwrite prompt positions before a block (MaPLe's deep text prompts).

    ``values[layer]`` is (K, D), or (G, K, D) with one set per group, written at ``positions``
    (absolute token positions, all inside the shared prefix).
    """

    positions: Sequence[int]
    values: Dict[int, torch.Tensor]


def _overwrite(x: torch.Tensor, positions: Sequence[int], values: torch.Tensor) -> torch.Tensor:
    """Out-of-place ``x[:, positions] = values`` for x (N, L, D); values (K, D) or (N, K, D)."""
    index = torch.as_tensor(list(positions), device=x.device)
    values = values.to(x.dtype)
    if values.dim() == 2:
        values = values.unsqueeze(0).expand(x.shape[0], -1, -1)
    return x.index_copy(1, index, values)


class TextEngine:
    """Encodes prompt sets with the fast (shared-prefix) or naive (full-prompt) path.

    ``capture`` runs the fast path eagerly ("none"), under torch.compile ("compile") or as replayed CUDA
    graphs ("cudagraphs"); ``compile_options`` go to torch.compile (see :mod:`promptcore.capture`).
    """

    def __init__(self, model: nn.Module, capture: str = "none", compile_options: Optional[dict] = None):
        self.tower = TextTower(model)
        self.fast = CapturedPath(self._fast_entry, capture, compile_options)

    def _fast_entry(self, *args):
        # looked up per call, so a subclass's (or a test's) encode_fast is the one captured
        return self.encode_fast(*args)

    def resolve_path(self, path: str) -> str:
        """The path ``path`` ("auto", "fast", "naive") runs on this tower: "auto" becomes "fast" where it
        is exact and "naive" elsewhere (warning once per reason); "fast" where it is not exact raises."""
        if path not in PATHS:
            raise ValueError(f"unknown text path {path!r}; choose one of {PATHS}")
        issue = self.tower.fast_path_issue
        if path == "fast" and issue is not None:
            raise ValueError(f"the fast text path is not exact for this model: {issue}")
        if path == "auto":
            if issue is None:
                return "fast"
            if issue not in _reported_fallbacks:
                _reported_fallbacks.add(issue)
                warnings.warn(f"promptcore: using the full-prompt text path because {issue}", stacklevel=3)
            return "naive"
        return path

    def encode(
        self,
        prompts: PromptSet,
        ctx: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        path: str = "auto",
        layer_prompts: Optional[LayerPrompts] = None,
    ) -> torch.Tensor:
        """Text features (G, C, E) of the prompt set with context ``ctx`` (and per-group ``bias``).

        ``ctx`` follows ``prompts.ctx_layout``: (K, D) shared, (C, K, D) class-specific,
        (G, K, D) per group. ``bias`` (G, D) is added to every context row of group g. A prompt set
        with per-group tokens gives (G, C, E) and takes no ``ctx``, ``bias`` or ``layer_prompts``.
        """
        if prompts.per_group and (ctx is not None or bias is not None or layer_prompts is not None):
            raise ValueError("a prompt set with per-group tokens takes no context, bias or layer prompts")
        resolved = self.resolve_path(path)
        # The fast path needs a shared prefix that holds every overwritten (deep-prompt) position.
        outside = layer_prompts is not None and max(layer_prompts.positions, default=-1) >= prompts.prefix_len
        if resolved == "fast" and (prompts.prefix_len == 0 or outside):
            resolved = "naive"
        if resolved == "fast":
            if not tracing_or_compiling():  # outside the captured path: a Python check, then an in-place copy
                prompts.refresh_token_embeds(self.tower)
            return self.fast(prompts, ctx, bias, layer_prompts)
        return self.encode_naive(prompts, ctx, bias, layer_prompts)

    # -- naive path -------------------------------------------------------------------------

    def encode_naive(self, prompts: PromptSet, ctx=None, bias=None, layer_prompts=None) -> torch.Tensor:
        """Full-length prompts through open_clip's blocks, the way the official code runs them."""
        tower = self.tower
        dtype = tower.dtype
        C, L = prompts.ids.shape[-2:]
        flat_ids = prompts.ids.reshape(-1, L)  # per-group tokens: the G x C prompts one after another
        with torch.no_grad():
            tokens = tower.token_embedding(flat_ids).to(dtype)
        pos = tower.positional_embedding[:L].to(dtype)
        x = assemble_prompts(tokens, prompts.slots.reshape(-1, L), pos, _cast(ctx, dtype), _cast(bias, dtype),
                             prompts.ctx_layout if ctx is not None else "shared")
        G = x.shape[0] * prompts.num_groups
        x = x.reshape(G * C, L, -1)
        ids = flat_ids.repeat(x.shape[0] // flat_ids.shape[0], 1)
        layer_inputs = None
        if layer_prompts is not None:
            layer_inputs = {
                layer: _naive_overwriter(layer_prompts.positions, vals, G, C)
                for layer, vals in layer_prompts.values.items()
            }
        feats = tower.encode_full(x, ids, layer_inputs)
        return feats.reshape(G, C, -1)

    # -- fast path --------------------------------------------------------------------------

    def encode_fast(self, prompts: PromptSet, ctx=None, bias=None, layer_prompts=None) -> torch.Tensor:
        """Shared prefix once per group, EOT-truncated suffixes attending to it."""
        tower = self.tower
        dtype = tower.dtype
        P = prompts.prefix_len
        layout = prompts.ctx_layout if ctx is not None else "shared"
        pos = tower.positional_embedding.to(dtype)
        if not tracing_or_compiling():
            prompts.refresh_token_embeds(tower)
        tokens = prompts.token_embeds.to(dtype)
        ctx, bias = _cast(ctx, dtype), _cast(bias, dtype)
        if layout == "class" and prompts.has_ctx(0, P):
            raise ValueError("class-specific context cannot sit in the shared prefix")

        # Which tensors carry one copy per group is known from the arguments; deciding it from
        # shapes would specialise the batch axis when the graph is traced for export.
        group_source = None
        if ctx is not None and layout == "group":
            group_source = ctx
        elif bias is not None:
            group_source = bias
        deep_groups = layer_prompts is not None and any(v.dim() == 3 for v in layer_prompts.values.values())
        if group_source is None and deep_groups:
            group_source = next(v for v in layer_prompts.values.values() if v.dim() == 3)
        G = group_source.shape[0] if group_source is not None else 1
        ctx_grouped = ctx is not None and (layout == "group" or bias is not None)

        prefix_has_ctx = prompts.has_ctx(0, P)
        prefix_layout = "shared" if layout == "class" else layout
        if prompts.per_group:
            G = prompts.num_groups
            suffixes = _per_group_inputs(prompts, tokens, pos)
            x_prefix = assemble_prompts(tokens[:, 0, :P], prompts.slots[:, 0, :P], pos[:P])[0]
        else:
            x_prefix = assemble_prompts(tokens[:1, :P], prompts.slots[:1, :P], pos[:P],
                                        ctx if prefix_has_ctx else None, bias if prefix_has_ctx else None,
                                        prefix_layout)[:, 0]
            suffixes = []
        if group_source is not None and not (prefix_has_ctx and ctx_grouped):
            x_prefix = x_prefix.expand(G, -1, -1)
        for bucket in ([] if prompts.per_group else prompts.buckets):
            members, length = prompts.members(bucket), bucket.length
            bucket_ctx = ctx if bucket.has_ctx else None
            if bucket_ctx is not None and layout == "class":
                bucket_ctx = ctx[members]
            x = assemble_prompts(tokens[members, P:P + length], prompts.slots[members, P:P + length],
                                 pos[P:P + length], bucket_ctx, bias if bucket.has_ctx else None, layout)
            eot = prompts.eot[members] - P
            suffixes.append(SuffixState(x, eot + 1, eot, bucket.has_ctx and ctx_grouped))
        last = len(tower.blocks) - 1
        for i in range(len(tower.blocks)):
            if layer_prompts is not None and i in layer_prompts.values:
                x_prefix = _overwrite(x_prefix, layer_prompts.positions, layer_prompts.values[i])
            # the last block's prefix output is never read: only its keys/values are
            x_prefix, k_p, v_p = tower.prefix_block(i, x_prefix, need_output=i < last)
            suffixes = [s.after(tower.suffix_block(i, s.x, k_p, v_p, s.lens, grouped=s.grouped)) for s in suffixes]
        rows = []
        for s in suffixes:
            x, eot = s.x, s.eot
            classes = torch.arange(x.shape[1], device=x.device)
            if eot.dim() == 2:  # per-group tokens: each group's own EOT row
                r = x[torch.arange(x.shape[0], device=x.device)[:, None], classes[None, :], eot]
            else:
                r = x[:, classes, eot]
            rows.append(r if s.grouped else r.expand(G, -1, -1))
        eot_rows = torch.cat(rows, dim=1).index_select(1, prompts.bucket_order)
        return tower.project(eot_rows)


def _per_group_inputs(prompts: PromptSet, tokens: torch.Tensor, pos: torch.Tensor) -> List[SuffixState]:
    """Suffix inputs of a per-group prompt set, one per length bucket, EOT rows (G, C_b). A class's
    suffix runs to its latest EOT over the groups; the rows after a group's own EOT are computed and
    never read (causal: they change nothing before)."""
    P = prompts.prefix_len
    G, D = tokens.shape[0], tokens.shape[-1]
    out = []
    for bucket in prompts.buckets:
        members, length = prompts.members(bucket), bucket.length
        t = tokens[:, members, P:P + length]
        Cb = t.shape[1]
        x = assemble_prompts(t.reshape(G * Cb, length, D), prompts.slots[:, members, P:P + length].reshape(G * Cb, -1),
                             pos[P:P + length])[0].reshape(G, Cb, length, D)
        eot = prompts.eot[:, members] - P
        out.append(SuffixState(x, eot.amax(dim=0) + 1, eot, True))
    return out


def _weight_key(weight: torch.Tensor) -> tuple:
    """What identifies a weight's current values short of reading them: a swapped tensor, an in-place write
    through it (version), a move or a cast all change the key."""
    return id(weight), weight._version, weight.data_ptr(), weight.dtype, weight.device


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _naive_overwriter(positions, values: torch.Tensor, G: int, C: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if values.dim() == 3:  # one set per group: repeat each group's values over its C prompts
        values = values.repeat_interleave(C, dim=0)
    return lambda x: _overwrite(x, positions, values)
