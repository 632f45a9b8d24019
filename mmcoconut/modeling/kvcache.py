"""Static KV cache of the multi-pass latent forward: preallocated K/V, written in place, nothing re-copied.

Per layer one K and one V buffer [B, H_kv, Tp, hd] (H_kv: the LM's K/V heads; fewer than its query heads under
grouped-query attention, expanded inside the attention, never stored), zero-initialised once per forward. A pass
runs the LM on its new columns with its view of the cache (:meth:`StaticKV.open`: the history and the pass's own
state, a :class:`PassKV`) handed to the attention function (``mmc=`` keyword, which every supported family passes
through to the registered attention implementation, see :func:`install`); the attention of pass k reads the history
(columns written by passes < k) and the pass's own new K/V, and stashes the new K/V. Between passes, in eager code,
:meth:`StaticKV.commit` writes the stashed columns into the buffers (one ``_foreach_copy_``) and hands out fresh
aliases of the buffers as the next pass's history. So the LM call itself never mutates a tensor: the same code
runs eagerly, under ``torch.compile(fullgraph=True)`` and under gradient checkpointing (a recomputed layer gets the
same PassKV, bound to its call, so it reads what the first run read).

Autograd. ``_Commit`` returns aliases of the buffers whose backward routes each pass's slice of the history
gradient to the K/V tensors that wrote those columns, and the whole gradient on to the previous commit's aliases
(a chain: a fixed number of backward ops per pass; gradients of later passes flow through the K/V of earlier
columns; nothing is detached). A later in-place write changes only columns that every earlier reader masked
out (probability exactly 0 and, as the buffers start at zero and hold finite values, an exactly-zero gradient),
so the write hides itself from the version counter (``_unsafe_set_version_counter``) instead of failing
autograd's check. Saved for backward per pass and layer: its queries and the buffer aliases (no copies).

Attention per pass shape: pass 0 (no history) SDPA over its own columns; one-column passes: scores against the
whole history buffer (masked beyond the pass) plus the new column, a fixed shape [B, H, 1, Tp + 1] for every
such pass (the query heads of a K/V group read their group's K/V); the last pass (columns [a, Tp)): SDPA over
cat(history[:a], new) = the full sequence, once. SDPA gets ``enable_gqa`` only when the heads differ.
"""
from __future__ import annotations

import sys

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


class PassKV:
    """One LM call's view of the cache: the history aliases (None before the first commit), `own` ([B,1,1,1] bool,
    one-column passes: the query sees its own column) and the list its new K/V are stashed in."""

    def __init__(self, hist: list, own: Optional[torch.Tensor], new: list):
        self.hist, self.own, self.new = hist, own, new

    def attend(self, layer: int, q, k, v, mask, dropout: float, scale: Optional[float]):
        """Attention of the current pass for `layer`: q [B,H,w,hd], k/v [B,H_kv,w,hd] (new columns), mask
        [B,1,w,*] bool."""
        self.new[2 * layer], self.new[2 * layer + 1] = k, v
        hk, hv = self.hist[2 * layer], self.hist[2 * layer + 1]
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        if hk is None:  # pass 0: the new columns only
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, **gqa)
        elif q.shape[2] == 1:
            out = _one_column(q, k, v, hk, hv, mask, self.own, dropout, scale)
        else:  # last pass, columns [Tp - w, Tp): the history before it + its own columns = the whole sequence
            a = hk.shape[2] - q.shape[2]
            out = F.scaled_dot_product_attention(q, torch.cat([hk[:, :, :a], k], 2), torch.cat([hv[:, :, :a], v], 2),
                                                 attn_mask=mask, dropout_p=dropout, scale=scale, **gqa)
        return out.transpose(1, 2).contiguous(), None


class StaticKV:
    """Buffers and per-pass state of one multi-pass forward (see module doc)."""

    def __init__(self, n_layer: int, batch: int, n_kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_heads, length, head_dim)
        self.bufs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * n_layer)]  # K0 V0 K1 V1 ..
        self.n_layer = n_layer
        self.hist: list[Optional[torch.Tensor]] = [None] * (2 * n_layer)
        self.current: Optional[PassKV] = None

    def open(self, own: Optional[torch.Tensor] = None) -> PassKV:
        """The next LM call's view: the history committed so far (`own`: see PassKV)."""
        self.current = PassKV(self.hist, own, [None] * len(self.hist))
        return self.current

    # ------------------------------------------------------------------ between LM calls (eager)
    def commit(self, a: int, b: int) -> None:
        """Write the stashed K/V of the pass that covered columns [a, b) and refresh the history aliases."""
        new = self.current.new if self.current is not None else [None]
        if any(t is None for t in new):
            raise RuntimeError("StaticKV.commit: the LM call did not go through the mmcoconut attention "
                               "(is the LM's attention implementation still the one MMCoconut installed?)")
        prev = [] if self.hist[0] is None else self.hist
        self.hist = list(_Commit.apply(tuple(self.bufs), (a, b), len(prev), *prev, *new))
        self.current = None

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
    """softmax over [history columns (mask), own column (own)] in fp32; fully masked rows give 0 (as SDPA).
    Grouped-query attention: the G query heads of a K/V head are one [G, hd] block against its K/V."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, _, hd = q.shape
    if H != k.shape[1]:
        q = q.reshape(B, k.shape[1], H // k.shape[1], hd)  # one column: [B, H_kv, G, hd]
    s_hist = torch.matmul(q, hk.transpose(-1, -2)) * scale  # [B,H,1,Tp]
    s_own = (q * k).sum(-1, keepdim=True) * scale  # [B,H,1,1]
    s = torch.cat([s_hist, s_own], -1).float().masked_fill(~torch.cat([mask, own], -1), float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min))
    p = (e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)).to(v.dtype)
    if dropout > 0:
        p = F.dropout(p, dropout, training=True)
    Tp = hk.shape[2]
    return (torch.matmul(p[..., :Tp], hv) + p[..., Tp:] * v).view(B, H, 1, hd)


# ---------------------------------------------------------------------- attention implementation hook
def _make_attention(base_name: str):
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, mmc=None,
                  **kwargs):
        if mmc is not None:
            return mmc.attend(module.layer_idx, query, key, value, attention_mask, dropout, scaling)
        from transformers import AttentionInterface

        if base_name == "eager":  # the family's own eager attention (GQA handled there)
            base = sys.modules[type(module).__module__].eager_attention_forward  # (imported: its class exists)
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
