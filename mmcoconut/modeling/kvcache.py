"""Static KV cache of the multi-pass latent forward: preallocated K/V, written in place, nothing re-copied.

Per layer one K and one V buffer [B, H, Tp, hd], zero-initialised once per forward. A pass runs the LM on its new
columns with the cache handed to the attention function (``mmc=`` keyword, which GPT-2 passes through to the
registered attention implementation, see :func:`install`); the attention of pass k reads the history (columns
written by passes < k) and the pass's own new K/V, and stashes the new K/V. Between passes, in eager code,
:meth:`StaticKV.commit` writes the stashed columns into the buffers (one ``_foreach_copy_``) and hands out fresh
aliases of the buffers as the next pass's history. So the LM call itself never mutates a tensor: the same code
runs eagerly and under ``torch.compile(fullgraph=True)``.

Autograd. ``_Commit`` returns aliases of the buffers whose backward routes each pass's slice of the history
gradient to the K/V tensors that wrote those columns, and the whole gradient on to the previous commit's aliases
(a chain: a fixed number of backward ops per pass; gradients of later passes flow through the K/V of earlier
columns; nothing is detached). A later in-place write changes only columns that every earlier reader masked
out (probability exactly 0 and, as the buffers start at zero and hold finite values, an exactly-zero gradient),
so the write hides itself from the version counter (``_unsafe_set_version_counter``) instead of failing
autograd's check. Saved for backward per pass and layer: its queries and the buffer aliases (no copies).

Attention per pass shape: pass 0 (no history) SDPA over its own columns; one-column passes: scores against the
whole history buffer (masked beyond the pass) plus the new column, a fixed shape [B, H, 1, Tp + 1] for every
such pass; the last pass (columns [a, Tp)): SDPA over cat(history[:a], new) = the full sequence, once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NAME_PREFIX = "mmcoconut_"


class _Commit(torch.autograd.Function):
    """forward(bufs, span, n_prev, *prev, *latest) -> aliases of bufs, after `latest` (this pass's K/V, buffer after
    buffer) is copied into columns span. prev: the previous commit's aliases (n_prev = len(bufs); none at the first
    commit). Backward: each buffer's gradient goes to `latest` sliced to span, and whole to `prev`, whose commit
    takes its own span from it: a commit has the same number of inputs and backward ops whatever the pass."""

    @staticmethod
    def forward(ctx, bufs, span, n_prev, *tensors):
        a, b = span
        versions = tuple(t._version for t in bufs)
        with torch.no_grad():
            torch._foreach_copy_([t[:, :, a:b] for t in bufs], list(tensors[n_prev:]))
        torch._C._autograd._unsafe_set_version_counter(tuple(bufs), versions)
        ctx.span, ctx.n_prev = span, n_prev
        return tuple(t.detach() for t in bufs)

    @staticmethod
    def backward(ctx, *grads):
        a, b = ctx.span
        to_prev = list(grads) if ctx.n_prev else []
        return (None, None, None, *to_prev, *[None if g is None else g[:, :, a:b] for g in grads])


class StaticKV:
    """Buffers and per-pass state of one multi-pass forward (see module doc)."""

    def __init__(self, n_layer: int, batch: int, n_head: int, length: int, head_dim: int, dtype, device):
        shape = (batch, n_head, length, head_dim)
        self.bufs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * n_layer)]  # K0 V0 K1 V1 ..
        self.n_layer = n_layer
        self.hist: list[Optional[torch.Tensor]] = [None] * (2 * n_layer)
        self.new: list[Optional[torch.Tensor]] = [None] * (2 * n_layer)
        self.own: Optional[torch.Tensor] = None  # [B,1,1,1] bool: the one-column pass's query sees itself

    # ------------------------------------------------------------------ inside the LM call (traceable)
    def attend(self, layer: int, q, k, v, mask, dropout: float, scale: Optional[float]):
        """Attention of the current pass for `layer`: q/k/v [B,H,w,hd] (new columns), mask [B,1,w,*] bool."""
        self.new[2 * layer], self.new[2 * layer + 1] = k, v
        hk, hv = self.hist[2 * layer], self.hist[2 * layer + 1]
        if hk is None:  # pass 0: the new columns only
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
        elif q.shape[2] == 1:
            out = _one_column(q, k, v, hk, hv, mask, self.own, dropout, scale)
        else:  # last pass, columns [Tp - w, Tp): the history before it + its own columns = the whole sequence
            a = hk.shape[2] - q.shape[2]
            out = F.scaled_dot_product_attention(q, torch.cat([hk[:, :, :a], k], 2), torch.cat([hv[:, :, :a], v], 2),
                                                 attn_mask=mask, dropout_p=dropout, scale=scale)
        return out.transpose(1, 2).contiguous(), None

    # ------------------------------------------------------------------ between LM calls (eager)
    def commit(self, a: int, b: int) -> None:
        """Write the stashed K/V of the pass that covered columns [a, b) and refresh the history aliases."""
        if any(t is None for t in self.new):
            raise RuntimeError("StaticKV.commit: the LM call did not go through the mmcoconut attention "
                               "(is the LM's attention implementation still the one MMCoconut installed?)")
        prev = [] if self.hist[0] is None else self.hist
        self.hist = list(_Commit.apply(tuple(self.bufs), (a, b), len(prev), *prev, *self.new))
        self.new = [None] * len(self.new)

    def to_dynamic_cache(self, config):
        """A transformers DynamicCache holding every committed column (for generation after the prompt)."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=config)
        except TypeError:  # older transformers
            cache = DynamicCache()
        with torch.no_grad():
            for layer in range(self.n_layer):
                cache.update(self.bufs[2 * layer], self.bufs[2 * layer + 1], layer)
        return cache


def _one_column(q, k, v, hk, hv, mask, own, dropout: float, scale: Optional[float]):
    """softmax over [history columns (mask), own column (own)] in fp32; fully masked rows give 0 (as SDPA)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s_hist = torch.matmul(q, hk.transpose(-1, -2)) * scale  # [B,H,1,Tp]
    s_own = (q * k).sum(-1, keepdim=True) * scale  # [B,H,1,1]
    s = torch.cat([s_hist, s_own], -1).float().masked_fill(~torch.cat([mask, own], -1), float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min))
    p = (e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)).to(v.dtype)
    if dropout > 0:
        p = F.dropout(p, dropout, training=True)
    Tp = hk.shape[2]
    return torch.matmul(p[..., :Tp], hv) + p[..., Tp:] * v


# ---------------------------------------------------------------------- attention implementation hook
def _make_attention(base_name: str):
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, mmc=None,
                  **kwargs):
        if mmc is not None:
            return mmc.attend(module.layer_idx, query, key, value, attention_mask, dropout, scaling)
        from transformers import AttentionInterface

        if base_name == "eager":
            from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward as base
        else:
            base = AttentionInterface._global_mapping[base_name]
        return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return attention


def install(lm) -> None:
    """Route the LM's attention through mmcoconut's implementation, which equals the current one (sdpa, eager,
    ...) unless an `mmc=StaticKV` keyword reaches it. Registered under "mmcoconut_<current>"; not saved with
    `save_pretrained` (the config keeps no attention implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = lm.config._attn_implementation or "eager"
    if base.startswith(NAME_PREFIX):
        return
    if base != "eager" and base not in AttentionInterface._global_mapping:
        raise ValueError(f"MMCoconut: unsupported attention implementation {base!r} of the LM")
    name = NAME_PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(name)
    else:
        lm.config._attn_implementation = name
