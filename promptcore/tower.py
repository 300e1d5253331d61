"""A read-only view of an open_clip model's text tower, and the fast path's per-block math.

open_clip keeps the text tower's modules at the top level of ``CLIP`` (``token_embedding``,
``transformer``, ``ln_final``, ...) and inside ``model.text`` (a ``TextTransformer``) for
``CustomTextCLIP``. :class:`TextTower` gives both one interface, decides whether the
shared-prefix shortcut is exact for the tower (causal mask, pooling at the EOT token, no
appended CLS token, standard residual blocks), and runs one of its residual blocks either the
official way (:meth:`TextTower.run_blocks`) or split into a shared prefix and suffixes that attend
to it (:meth:`TextTower.prefix_block`, :meth:`TextTower.suffix_block`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from promptcore.kernels import prefix_attention


class UnsupportedModelError(ValueError):
    """The model has no text tower promptcore can drive."""


def _is_standard_causal_mask(mask: torch.Tensor) -> bool:
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        return False
    upper = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool(torch.isneginf(mask[upper]).all() and (mask[~upper] == 0).all())


def _block_issue(block: nn.Module) -> Optional[str]:
    for name in ("ln_1", "ln_2", "attn", "mlp", "ls_1", "ls_2"):
        if not hasattr(block, name):
            return f"block {type(block).__name__} has no {name}"
    if hasattr(block, "ln_1_kv") or hasattr(block, "ln_attn") or hasattr(block, "ln_inner"):
        return f"block {type(block).__name__} has extra norms"
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention):
        return f"attention {type(attn).__name__} is not nn.MultiheadAttention"
    if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
        return "attention uses separate q/k/v projections or extra key biases"
    if not all(hasattr(block.mlp, n) for n in ("c_fc", "gelu", "c_proj")) or len(block.mlp) != 3:
        return "MLP is not c_fc -> activation -> c_proj"
    for ls in (block.ls_1, block.ls_2):
        if not isinstance(ls, nn.Identity) and not hasattr(ls, "gamma"):
            return f"layer scale {type(ls).__name__} is not supported"
    return None


class TextTower:
    """Uniform access to the text tower of an open_clip ``CLIP`` or ``CustomTextCLIP``."""

    def __init__(self, model: nn.Module):
        text = getattr(model, "text", None)
        if text is not None and hasattr(text, "token_embedding") and hasattr(text, "transformer"):
            src = text
            self.pool_type = getattr(text, "pool_type", "argmax")
            self.eos_id = getattr(text, "eos_id", None)
            self.cls_emb = getattr(text, "cls_emb", None)
            self.use_pad_mask = bool(getattr(text, "use_pad_mask", False))
            self.pad_id = getattr(text, "pad_id", 0)
            self.correct_cls_mask = bool(getattr(text, "correct_cls_mask", False))
        elif hasattr(model, "token_embedding") and hasattr(model, "transformer") and hasattr(model, "ln_final"):
            src = model
            self.pool_type = getattr(model, "text_pool_type", "argmax")
            self.eos_id = getattr(model, "text_eos_id", None)
            self.cls_emb = None
            self.use_pad_mask = False
            self.pad_id = 0
            self.correct_cls_mask = False
        else:
            kind = type(text).__name__ if text is not None else type(model).__name__
            raise UnsupportedModelError(
                f"{kind} has no token-embedding text transformer; promptcore supports open_clip CLIP and "
                "CustomTextCLIP models with a TextTransformer (Hugging Face text towers are not supported)"
            )
        self.src = src
        self.token_embedding: nn.Embedding = src.token_embedding
        self.transformer: nn.Module = src.transformer
        self.blocks = list(src.transformer.resblocks)
        self.ln_final: nn.Module = src.ln_final
        self.batch_first = bool(getattr(src.transformer, "batch_first", True))
        self.width = self.token_embedding.weight.shape[1]
        self.context_length = int(getattr(src, "context_length", src.positional_embedding.shape[0]))
        self.heads = self.blocks[0].attn.num_heads if hasattr(self.blocks[0], "attn") else None
        self.fast_path_issue = self._find_fast_path_issue()

    # Read through to the model so that .to()/.half() on it are always seen.
    @property
    def positional_embedding(self) -> torch.Tensor:
        return self.src.positional_embedding

    @property
    def text_projection(self):
        return self.src.text_projection

    @property
    def attn_mask(self) -> Optional[torch.Tensor]:
        return getattr(self.src, "attn_mask", None)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the transformer (its MLP weights' dtype, as open_clip casts)."""
        blk = self.blocks[0]
        if hasattr(blk, "mlp") and hasattr(blk.mlp, "c_fc"):
            return blk.mlp.c_fc.weight.dtype
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def output_dim(self) -> int:
        proj = self.text_projection
        if proj is None:
            return self.width
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def _find_fast_path_issue(self) -> Optional[str]:
        """Why prefix sharing / EOT truncation would not be exact here (None when it is)."""
        if self.attn_mask is None:
            return "the text transformer is bidirectional (no causal mask)"
        if not _is_standard_causal_mask(self.attn_mask):
            return "the attention mask is not the standard causal mask"
        if self.cls_emb is not None:
            return "the tower appends a CLS token and pools there"
        if self.pool_type not in ("argmax", "eos"):
            return f"the tower pools with {self.pool_type!r}, not at the end-of-text token"
        if self.pool_type == "eos" and self.eos_id is None:
            return "the tower pools at 'eos' but names no eos id"
        for i, blk in enumerate(self.blocks):
            issue = _block_issue(blk)
            if issue is not None:
                return f"layer {i}: {issue}"
        return None

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Index of the pooled (end-of-text) token in each row of ``ids``, as the tower computes it."""
        if self.pool_type == "eos":
            return (ids == self.eos_id).int().argmax(dim=-1)
        return ids.argmax(dim=-1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """ln_final then the text projection, applied to pooled rows (..., width)."""
        x = self.ln_final(pooled)
        proj = self.text_projection
        if proj is None:
            return x
        if isinstance(proj, nn.Linear):
            return proj(x)
        return x @ proj

    def run_blocks(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], layer_inputs=None) -> torch.Tensor:
        """Run every residual block on batch-first ``x`` through open_clip's own modules.

        ``layer_inputs`` maps a block index to a callable applied to the hidden states before
        that block (MaPLe's deep prompts).
        """
        for i, blk in enumerate(self.blocks):
            if layer_inputs is not None and i in layer_inputs:
                x = layer_inputs[i](x)
            if self.batch_first:
                x = blk(x, attn_mask=attn_mask)
            else:
                x = blk(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)
        return x

    def encode_full(self, x: torch.Tensor, ids: torch.Tensor, layer_inputs=None) -> torch.Tensor:
        """The official text path on full-length inputs.

        ``x`` (N, L, D) are token embeddings with positional embeddings already added, ``ids``
        (N, L) the token ids (for pooling and padding masks). Returns (N, output_dim).
        """
        attn_mask = self.attn_mask
        if self.cls_emb is not None:
            cls = (self.cls_emb.to(x.dtype) + self.positional_embedding[x.shape[1]].to(x.dtype))
            x = torch.cat([x, cls.expand(x.shape[0], 1, -1)], dim=1)
        if self.use_pad_mask or self.cls_emb is not None:
            additive = self.src._build_additive_mask(ids, x.shape[1], x.dtype)
            if attn_mask is not None:
                attn_mask = attn_mask[: x.shape[1], : x.shape[1]].unsqueeze(0) + additive
            else:
                attn_mask = additive
        elif attn_mask is not None:
            attn_mask = attn_mask[: x.shape[1], : x.shape[1]]
        x = self.run_blocks(x, attn_mask, layer_inputs)
        if self.cls_emb is not None:
            return self.project(x[:, -1])
        if self.pool_type == "first":
            pooled = x[:, 0]
        elif self.pool_type == "last":
            pooled = x[:, -1]
        elif self.pool_type in ("argmax", "eos"):
            pooled = x[torch.arange(x.shape[0], device=x.device), self.pool_positions(ids)]
        else:
            raise UnsupportedModelError(f"text pooling {self.pool_type!r} gives no sentence feature")
        return self.project(pooled)

    # -- one residual block, split into a shared prefix and its suffixes (the fast path) ----------
    # The same arithmetic as open_clip's ResidualAttentionBlock (pre-norm attention then MLP, each
    # with its layer scale), written out so that suffix queries can attend to the prefix's keys and
    # values. Only valid where ``fast_path_issue`` is None (checked by ``_block_issue``).

    def prefix_block(self, index: int, x_prefix: torch.Tensor, need_output: bool = True):
        """Block ``index`` over the shared prefix (G, P, D); returns (output or None, keys, values),
        keys and values (G, P, H, d). ``need_output=False`` stops after the keys/values (the last
        block's prefix output is never read)."""
        blk = self.blocks[index]
        attn = blk.attn
        G, P, D = x_prefix.shape
        h = layer_norm(blk.ln_1, x_prefix)
        q_p, k_p, v_p = split_heads(F.linear(h, attn.in_proj_weight, attn.in_proj_bias), self.heads)
        if not need_output:
            return None, k_p, v_p
        o = F.scaled_dot_product_attention(q_p.transpose(1, 2).float(), k_p.transpose(1, 2).float(),
                                           v_p.transpose(1, 2).float(), is_causal=True)
        o = o.transpose(1, 2).reshape(G, P, D).to(x_prefix.dtype)
        out = x_prefix + blk.ls_1(F.linear(o, attn.out_proj.weight, attn.out_proj.bias)).to(x_prefix.dtype)
        out = out + blk.ls_2(blk.mlp(layer_norm(blk.ln_2, out))).to(out.dtype)
        return out, k_p, v_p

    def suffix_block(self, index: int, x_suffix: torch.Tensor, k_p: torch.Tensor, v_p: torch.Tensor,
                     suffix_lens: torch.Tensor, grouped: bool = True) -> torch.Tensor:
        """Block ``index`` over suffixes attending to the prefix keys/values (G, P, H, d) plus their own.

        ``x_suffix`` is (G, C, S, D), or (1, C, S, D) shared by every group when ``grouped`` is False
        (the output is then per group: (G, C, S, D)). ``suffix_lens`` (C,) are the live positions.
        """
        blk = self.blocks[index]
        attn = blk.attn
        heads = self.heads
        G, D = k_p.shape[0], x_suffix.shape[-1]
        h = layer_norm(blk.ln_1, x_suffix)
        q_s, k_s, v_s = split_heads(F.linear(h, attn.in_proj_weight, attn.in_proj_bias), heads)  # G' C S H d
        if not grouped:
            q_s, k_s, v_s = (t.expand(G, *t.shape[1:]) for t in (q_s, k_s, v_s))
        o = prefix_attention(q_s, k_s, v_s, k_p, v_p, suffix_lens, 1.0 / math.sqrt(D // heads))
        C, S = o.shape[1], o.shape[2]
        out = x_suffix + blk.ls_1(F.linear(o.reshape(G, C, S, D), attn.out_proj.weight, attn.out_proj.bias))
        out = out.to(x_suffix.dtype)
        return out + blk.ls_2(blk.mlp(layer_norm(blk.ln_2, out))).to(out.dtype)


def layer_norm(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with fp32 statistics, cast back to the input dtype."""
    weight = mod.weight.float() if mod.weight is not None else None
    bias = mod.bias.float() if mod.bias is not None else None
    return F.layer_norm(x.float(), mod.normalized_shape, weight, bias, mod.eps).to(x.dtype)


def split_heads(qkv: torch.Tensor, heads: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused in-projection output (..., 3 D) as q, k, v, each (..., heads, D / heads)."""
    *lead, three_d = qkv.shape
    width = three_d // 3
    q, k, v = qkv.view(*lead, 3, heads, width // heads).unbind(-3)
    return q, k, v
