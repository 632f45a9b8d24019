"""Deferred weight gradients of the decoder's projections (GPT-2's Conv1D, nn.Linear elsewhere) over the multi-pass
latent forward.

Every LM pass calls each projection once. Plain autograd gives every call its own weight gradient (x_pᵀ g_p written
into a fresh weight-sized tensor) and then adds it into the weight's input buffer: two weight-sized writes per pass
and layer, which at B = 8 cost more than the rank-8 product itself (bench/RESULTS.md, "Hot path at GPT-2 124M").

Inside :func:`deferred_weight_grads`, each projection weight goes through `_Gate` (identity; one per weight and
micro-batch) and the layer's product through `_Proj` (Conv1D: addmm(bias, x, W), W [in, out]; nn.Linear:
linear(x, W, bias), W [out, in]), whose backward hands its (x_p, g_p) to the micro-batch's buffers: a wide call
(pass 0, the last pass) is multiplied into one gradient buffer per weight in place (``addmm_``); the rows of the
narrow one-column passes (a few KB against a weight of MBs) are kept and multiplied out by one GEMM over all of
them. Autograd runs the gate's backward only after every call that used the gated weight has run its own, so the
gate hands the complete gradient to the weight: its AccumulateGrad (and DeepSpeed's gradient hooks on it) run once
per micro-batch, at the same point of the backward as without the context. The forward is bitwise the same; the
weight gradient is the same sum of products, rounded in another order. Bias and input gradients are plain autograd's.
Eager only: not for torch.compile (side effects in backward) nor ZeRO-3 (partitioned weights); the caller decides.
Under autocast (e.g. HF Trainer's mixed precision) the calls stay plain: autograd then owns the dtype casts.
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn


class _Buffers:
    """One micro-batch's state: the gated weights and, per layer index, the gradient buffer (= sum of aᵀ b over the
    calls: Conv1D a = input, b = grad-output; nn.Linear the other way round) and the stashed (a, b) rows of the
    narrow calls (one-column passes), multiplied out once by the gate."""

    def __init__(self):
        self.gated: dict[int, torch.Tensor] = {}
        self.grads: dict[int, torch.Tensor] = {}
        self.stash: dict[int, list] = {}

    def accumulate(self, key: int, x: torch.Tensor, g: torch.Tensor) -> None:
        if 4 * x.shape[0] * (x.shape[1] + g.shape[1]) <= x.shape[1] * g.shape[1]:  # rows << weight: keep them
            self.stash.setdefault(key, []).append((x, g))
            return
        self._add(key, x, g)

    def _add(self, key: int, x: torch.Tensor, g: torch.Tensor) -> None:
        buf = self.grads.get(key)
        if buf is None:
            self.grads[key] = x.t().mm(g)
        else:
            buf.addmm_(x.t(), g)

    def pop(self, key: int):
        """The weight gradient of everything accumulated under `key` (None if nothing was)."""
        rows = self.stash.pop(key, None)
        if rows:
            self._add(key, torch.cat([x for x, _ in rows]), torch.cat([g for _, g in rows]))
        return self.grads.pop(key, None)


class _Gate(torch.autograd.Function):
    """Identity on a weight; backward: the buffered gradient (+ any plain gradient that reached the alias)."""

    @staticmethod
    def forward(ctx, bufs: _Buffers, key: int, weight: torch.Tensor):
        ctx.bufs, ctx.key = bufs, key
        ctx.set_materialize_grads(False)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        buf = ctx.bufs.pop(ctx.key)
        if grad is not None:
            buf = grad if buf is None else buf + grad
        return None, None, buf


class _Proj(torch.autograd.Function):
    """A projection of 2-D rows x: Conv1D's addmm(bias, x, weight) (transposed False) or nn.Linear's
    linear(x, weight, bias) (transposed True); the weight gradient goes to the buffers."""

    @staticmethod
    def forward(ctx, x, weight, bias, bufs: _Buffers, key: int, transposed: bool):
        ctx.save_for_backward(x, weight)
        ctx.bufs, ctx.key, ctx.transposed = bufs, key, transposed
        return F.linear(x, weight, bias) if transposed else torch.addmm(bias, x, weight)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        if ctx.needs_input_grad[0]:
            gx = g.mm(weight) if ctx.transposed else g.mm(weight.t())
        else:
            gx = None
        if ctx.needs_input_grad[1]:
            ctx.bufs.accumulate(ctx.key, *((g, x) if ctx.transposed else (x, g)))
        gb = g.sum(0) if ctx.needs_input_grad[2] else None
        return gx, None, gb, None, None, None


def _proj_forward(module: nn.Module, bufs: _Buffers, key: int, x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and module.weight.requires_grad) or torch.is_autocast_enabled(x.device.type):
        return type(module).forward(module, x)  # nothing to defer; under autocast plain autograd keeps the casts
    w = bufs.gated.get(key)
    if w is None:
        w = bufs.gated[key] = _Gate.apply(bufs, key, module.weight)
    linear = isinstance(module, nn.Linear)
    size_out = x.size()[:-1] + (w.shape[0] if linear else w.shape[1],)
    return _Proj.apply(x.reshape(-1, x.size(-1)), w, module.bias, bufs, key, linear).view(size_out)


@contextmanager
def deferred_weight_grads(modules: Iterable[nn.Module]):
    """Within the context, forward calls of these Conv1D / nn.Linear modules defer their weight gradient (module
    doc). The backward may run after the context has exited."""
    bufs, patched = _Buffers(), []
    try:
        for key, m in enumerate(modules):
            if "forward" in vars(m):  # someone else's instance forward (e.g. an accelerate hook): leave it
                continue
            m.forward = partial(_proj_forward, m, bufs, key)  # an instance attribute shadows the class forward
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward
