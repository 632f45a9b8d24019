"""Fused embedding injection: token embeddings, image features and latent states in one op.

``inject_embeddings(input_ids [B,T] int64, weight [V,D], sources [N,D], source_index [B,T] int64) -> [B,T,D]``
row (b,t) = sources[source_index[b,t]] if source_index[b,t] >= 0 else weight[input_ids[b,t]].

Backend (env ``MMCOCONUT_INJECT``): ``auto`` (default) uses the C++/CUDA extension of the tensors' device when
it builds, else the PyTorch reference with one warning; ``ref`` forces the reference; ``ext`` forces the
extension (RuntimeError if it cannot be built). Deterministic backward: ``MMCOCONUT_DETERMINISTIC=1`` or
``torch.use_deterministic_algorithms(True)``. Nothing is compiled at import time.
"""

from __future__ import annotations

import os
import warnings

import torch

from .build import load_extension, try_load_extension
from .reference import inject_embeddings_reference, validate_inputs

__all__ = ["inject_embeddings", "inject_embeddings_reference", "backend_for", "deterministic_enabled"]

_EXT_DEVICE_TYPES = ("cpu", "cuda")
_warned: set[str] = set()


def _mode() -> str:
    mode = os.environ.get("MMCOCONUT_INJECT", "auto").strip().lower() or "auto"
    if mode not in ("auto", "ref", "ext"):
        raise ValueError(f"MMCOCONUT_INJECT must be auto, ref or ext, got {mode!r}")
    return mode


def deterministic_enabled() -> bool:
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("MMCOCONUT_DETERMINISTIC") == "1"


def backend_for(device) -> str:
    """"ext" or "ref": the implementation :func:`inject_embeddings` uses for tensors on ``device``."""
    kind = torch.device(device).type
    mode = _mode()
    if mode == "ref":
        return "ref"
    if mode == "ext":
        load_extension(kind)  # raises a clear RuntimeError when unavailable
        return "ext"
    if kind in _EXT_DEVICE_TYPES and try_load_extension(kind) is not None:
        return "ext"
    if kind not in _warned:
        _warned.add(kind)
        reason = "no extension for this device type"
        if kind in _EXT_DEVICE_TYPES:
            try:
                load_extension(kind)
            except RuntimeError as exc:
                reason = str(exc)
        warnings.warn(f"mmcoconut.kernels: using the PyTorch reference for inject_embeddings on {kind} "
                      f"({reason})", RuntimeWarning, stacklevel=3)
    return "ref"


class _InjectFunction(torch.autograd.Function):
    """Autograd wrapper around the extension; saves only ids/index (no [B,T,D] or [V,D] tensors)."""

    @staticmethod
    def forward(ctx, input_ids, weight, sources, source_index, ext):
        ctx.ext = ext
        ctx.sizes = (weight.shape[0], sources.shape[0])
        ctx.save_for_backward(input_ids, source_index)
        return ext.forward(input_ids, weight, sources, source_index)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        input_ids, source_index = ctx.saved_tensors
        need_weight, need_sources = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        if not (need_weight or need_sources):
            return None, None, None, None, None
        grad_weight, grad_sources = ctx.ext.backward(grad_out, input_ids, source_index, *ctx.sizes,
                                                     need_weight, need_sources, deterministic_enabled())
        return None, grad_weight, grad_sources, None, None


def inject_embeddings(input_ids: torch.Tensor, weight: torch.Tensor, sources: torch.Tensor,
                      source_index: torch.Tensor) -> torch.Tensor:
    validate_inputs(input_ids, weight, sources, source_index)
    if backend_for(weight.device) == "ref":
        return inject_embeddings_reference(input_ids, weight, sources, source_index)
    ext = load_extension(weight.device.type)
    return _InjectFunction.apply(input_ids, weight, sources, source_index, ext)

