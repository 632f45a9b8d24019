"""Fused embedding injection: token embeddings and image features in one op (a torch.library custom op).

``inject_embeddings(input_ids [B,T] int64, weight [V,D], sources [N,D], source_index [B,T] int64) -> [B,T,D]``
row (b,t) = sources[source_index[b,t]] if source_index[b,t] >= 0 else weight[input_ids[b,t]].

Importing this package plugs the op into the model (``mmcoconut.modeling.inject.use_fused``). Registered as
``torch.ops.mmcoconut.inject_embeddings`` (fake implementation for torch.compile, autograd through
``torch.ops.mmcoconut.inject_embeddings_backward``): it traces under ``torch.compile(fullgraph=True)`` and never
reads device data on the host. Backend (env ``MMCOCONUT_INJECT``, read per call outside any traced code):
``auto`` (default) uses the C++/CUDA extension of the tensors' device when it builds, else a pure-PyTorch
implementation with one warning; ``ref`` forces the pure-PyTorch one; ``ext`` forces the extension (RuntimeError if
it cannot be built). Deterministic backward: ``MMCOCONUT_DETERMINISTIC=1`` or
``torch.use_deterministic_algorithms(True)``. Index range checks (host syncs) run only in debug mode
(``MMCOCONUT_DEBUG=1`` or :func:`set_debug`): here on the host before the op, and inside the CUDA op (it records the
first out-of-range row on the device and raises IndexError like the CPU op; outside debug mode it writes a zero row
and reads nothing back). The CPU extension always checks (host memory, no sync). Nothing is compiled at import
time.
"""

from __future__ import annotations

import os
import warnings

import torch

from .build import load_extension, try_load_extension
from ..modeling import inject as _model_inject
from ..modeling.inject import check_index_range, inject_embeddings_reference, inject_embeddings_torch, validate_inputs

__all__ = ["inject_embeddings", "inject_embeddings_reference", "backend_for", "deterministic_enabled",
           "debug_enabled", "set_debug"]

_EXT_DEVICE_TYPES = ("cpu", "cuda")
_warned: set[str] = set()
_DEBUG = os.environ.get("MMCOCONUT_DEBUG") == "1"


def set_debug(enabled: bool) -> None:
    """Turn the host-side index checks (device syncs) of :func:`inject_embeddings` on or off."""
    global _DEBUG
    _DEBUG = bool(enabled)


def debug_enabled() -> bool:
    return _DEBUG


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
        warnings.warn(f"mmcoconut.kernels: using the PyTorch implementation of inject_embeddings on {kind} "
                      f"({reason})", RuntimeWarning, stacklevel=3)
    return "ref"


# ------------------------------------------------------------------ pure-PyTorch backward (no host reads)
def _segment_sum(grad_rows, keys, num: int):
    """[num, D]: sum of grad_rows[r] over rows with keys[r] == k (keys == num: dropped), fp32 accumulation."""
    acc = torch.zeros((num + 1, grad_rows.shape[1]), dtype=torch.float32, device=grad_rows.device)
    acc.index_add_(0, keys, grad_rows.float())
    return acc[:num].to(grad_rows.dtype)


def _torch_backward(grad, input_ids, source_index, V: int, N: int, need_weight: bool, need_sources: bool):
    D = grad.shape[-1]
    rows = grad.reshape(-1, D)
    index = source_index.reshape(-1)
    injected = index >= 0
    gw = _segment_sum(rows, torch.where(injected, V, input_ids.reshape(-1)), V) if need_weight \
        else grad.new_empty((0, D))
    gs = _segment_sum(rows, torch.where(injected, index, N), N) if need_sources else grad.new_empty((0, D))
    return gw, gs


# ------------------------------------------------------------------ the registered ops
@torch.library.custom_op("mmcoconut::inject_embeddings", mutates_args=())
def _inject_op(input_ids: torch.Tensor, weight: torch.Tensor, sources: torch.Tensor,
               source_index: torch.Tensor) -> torch.Tensor:
    if backend_for(weight.device) == "ext":
        ext = load_extension(weight.device.type)
        if weight.device.type == "cuda":  # range check inside the kernel in debug mode (one host read)
            return ext.forward(input_ids, weight, sources, source_index, _DEBUG)
        return ext.forward(input_ids, weight, sources, source_index)
    return inject_embeddings_torch(input_ids, weight, sources, source_index)


@_inject_op.register_fake
def _inject_fake(input_ids, weight, sources, source_index):
    return weight.new_empty((*input_ids.shape, weight.shape[1]))


@torch.library.custom_op("mmcoconut::inject_embeddings_backward", mutates_args=())
def _inject_backward_op(grad: torch.Tensor, input_ids: torch.Tensor, source_index: torch.Tensor, num_weights: int,
                        num_sources: int, need_weight: bool, need_sources: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight [V,D] or [0,D], grad_sources [N,D] or [0,D]) in grad's dtype."""
    if backend_for(grad.device) == "ext":
        gw, gs = load_extension(grad.device.type).backward(
            grad, input_ids, source_index, num_weights, num_sources, need_weight, need_sources,
            deterministic_enabled())
        D = grad.shape[-1]
        return (gw if need_weight else grad.new_empty((0, D))), (gs if need_sources else grad.new_empty((0, D)))
    return _torch_backward(grad, input_ids, source_index, num_weights, num_sources, need_weight, need_sources)


@_inject_backward_op.register_fake
def _inject_backward_fake(grad, input_ids, source_index, num_weights, num_sources, need_weight, need_sources):
    D = grad.shape[-1]
    return grad.new_empty((num_weights if need_weight else 0, D)), grad.new_empty((num_sources if need_sources else 0, D))


def _setup_context(ctx, inputs, output):
    input_ids, weight, sources, source_index = inputs
    ctx.save_for_backward(input_ids, source_index)
    ctx.sizes = (weight.shape[0], sources.shape[0])


def _backward(ctx, grad):
    input_ids, source_index = ctx.saved_tensors
    need_weight, need_sources = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if not (need_weight or need_sources):
        return None, None, None, None
    gw, gs = torch.ops.mmcoconut.inject_embeddings_backward(grad.contiguous(), input_ids, source_index, *ctx.sizes,
                                                           need_weight, need_sources)
    return None, (gw if need_weight else None), (gs if need_sources else None), None


_inject_op.register_autograd(_backward, setup_context=_setup_context)


def inject_embeddings(input_ids: torch.Tensor, weight: torch.Tensor, sources: torch.Tensor,
                      source_index: torch.Tensor) -> torch.Tensor:
    """The op (see module doc). Metadata checks always; index range checks only in debug mode."""
    validate_inputs(input_ids, weight, sources, source_index)
    if _DEBUG:
        check_index_range(input_ids, source_index, weight.shape[0], sources.shape[0])
    return torch.ops.mmcoconut.inject_embeddings(input_ids, weight, sources, source_index)


_model_inject.use_fused(inject_embeddings)  # the model's embedding function runs this op from now on
