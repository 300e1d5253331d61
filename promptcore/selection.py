"""Confident-view selection shared by TPT and ZERO: softmax entropies, the lowest-entropy views,
the entropy of the mean probability (TPT's loss) and ZERO's vote (azshue/TPT ``select_confident_samples``
and ``avg_entropy``; ZERO's ``greedy_break``).

TPT and ZERO pass the per-view entropies and argmaxes that :func:`promptcore.kernels.cosine_logits`
computes with the logits (``with_entropy=True``: fused into the scoring kernel on a GPU);
:func:`view_entropy` is the same formula for logits that come without them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def check_fraction(selection) -> None:
    """Raise a ValueError unless ``selection`` is a number in (0, 1]."""
    if not isinstance(selection, (int, float)) or isinstance(selection, bool) or not 0 < selection <= 1:
        raise ValueError(f"selection must be a fraction in (0, 1], got {selection!r}")


def kept_views(n_views: int, selection: float) -> int:
    """``int(n_views * selection)``, the number of confident views kept; a ValueError when it keeps none."""
    k = int(n_views * selection)
    if k < 1:
        raise ValueError(f"selection {selection} of {n_views} views keeps no view; "
                         "int(n_views * selection) must be at least 1")
    return k


def view_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy over the last dim (the official ``-(softmax * log_softmax).sum()``), in fp32."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def select_confident(logits: torch.Tensor, selection: float, entropy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (..., k) of the ``k = int(V * selection)`` lowest-entropy views of logits (..., V, C).

    ``entropy`` (..., V): the views' softmax entropies if already computed (by the scoring op), else
    :func:`view_entropy` of ``logits``. Sorted stably, so ties go to the lower view index.
    """
    k = kept_views(logits.shape[-2], selection)
    entropy = _entropies(logits, entropy)
    return torch.argsort(entropy, dim=-1, stable=True)[..., :k]


def _entropies(logits: torch.Tensor, entropy: Optional[torch.Tensor]) -> torch.Tensor:
    if entropy is None:
        return view_entropy(logits)
    if entropy.shape != logits.shape[:-1]:
        raise ValueError(f"entropy {tuple(entropy.shape)} does not match logits {tuple(logits.shape)}: "
                         "one entropy per view expected")
    return entropy


def avg_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the mean probability over the views, (..., k, C) -> (...), the official formula in fp32."""
    x = logits.float()
    logp = x - x.logsumexp(dim=-1, keepdim=True)
    avg = logp.logsumexp(dim=-2) - math.log(logp.shape[-2])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg * avg.exp()).sum(dim=-1)


def zero_vote(logits: torch.Tensor, selection: float, entropy: Optional[torch.Tensor] = None,
              view_argmax: Optional[torch.Tensor] = None):
    """ZERO's prediction from logits (N, V, C) of each image's views; returns (preds, votes, selected).

    ``entropy`` and ``view_argmax`` (N, V): the views' softmax entropies and argmax classes if already
    computed (by the scoring op, first index on ties as ``torch.argmax``); else computed from ``logits``.

    The ``int(V * selection)`` lowest-entropy views are kept (as TPT selects); each kept view votes
    for its argmax class (the zero-temperature limit of its softmax: a one-hot vector) and the class
    with most votes wins. Ties are broken as the official ``greedy_break``: walking through the views
    that were NOT kept, in increasing entropy, the first whose argmax is a tied class decides. If none
    does (or all views were kept), the tied class with the highest logit in the most confident view
    that was not kept (else the most confident view) wins -- the official fallback intends this but
    indexes with ``~ties`` on an integer tensor.
    """
    N, V, C = logits.shape
    k = kept_views(V, selection)
    order = torch.argsort(_entropies(logits, entropy), dim=-1, stable=True)
    selected = order[:, :k]
    if view_argmax is None:
        view_argmax = logits.argmax(dim=-1)  # (N, V)
    elif view_argmax.shape != logits.shape[:-1]:
        raise ValueError(f"view_argmax {tuple(view_argmax.shape)} does not match logits {tuple(logits.shape)}")
    votes = F.one_hot(view_argmax.gather(1, selected), C).sum(dim=1)  # (N, C)
    top = votes.max(dim=-1, keepdim=True).values
    tied = votes == top
    preds = votes.argmax(dim=-1)
    rest = order[:, k:]
    if rest.shape[1] > 0:
        rest_argmax = view_argmax.gather(1, rest)  # (N, V - k), most confident first
        hit = tied.gather(1, rest_argmax)
        first = hit.float().argmax(dim=-1)  # first True (0 when none)
        greedy = rest_argmax.gather(1, first[:, None])[:, 0]
        fallback_view = rest[:, 0]
    else:
        hit = torch.zeros(N, 1, dtype=torch.bool, device=logits.device)
        greedy = preds
        fallback_view = order[:, 0]
    fallback_logits = logits.gather(1, fallback_view[:, None, None].expand(N, 1, C))[:, 0].float()
    fallback = fallback_logits.masked_fill(~tied, float("-inf")).argmax(dim=-1)
    broken = torch.where(hit.any(dim=-1), greedy, fallback)
    preds = torch.where(tied.sum(dim=-1) > 1, broken, preds)
    return preds, votes, selected
