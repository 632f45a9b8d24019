"""Embedding injection: row (b,t) = sources[source_index[b,t]] if source_index[b,t] >= 0 else weight[input_ids[b,t]].

`inject_embeddings` is what the model calls: the fused op (C++/CUDA, a torch.library custom op) once
`mmcoconut.kernels` has plugged it in with :func:`use_fused` (mmcoconut.factory and mmcoconut.export import it, so
training, evaluation and the CLIs run it), else the pure-PyTorch implementation below (plain autograd ops, no
host reads; what an export runs where mmcoconut is not installed). `inject_embeddings_reference` adds the range
checks: the test oracle.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def validate_inputs(input_ids: torch.Tensor, weight: torch.Tensor, sources: torch.Tensor,
                    source_index: torch.Tensor) -> None:
    """Cheap metadata checks (no data reads); raise ValueError with a clear message."""
    for name, t in (("input_ids", input_ids), ("weight", weight), ("sources", sources),
                    ("source_index", source_index)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"inject_embeddings: {name} must be a tensor, got {type(t).__name__}")
    if input_ids.dtype != torch.int64 or source_index.dtype != torch.int64:
        raise ValueError(f"inject_embeddings: input_ids and source_index must be int64, got "
                         f"{input_ids.dtype} and {source_index.dtype}")
    if input_ids.dim() != 2 or input_ids.shape != source_index.shape:
        raise ValueError(f"inject_embeddings: input_ids and source_index must be [B,T] of equal shape, "
                         f"got {tuple(input_ids.shape)} and {tuple(source_index.shape)}")
    if weight.dim() != 2 or sources.dim() != 2 or weight.shape[1] != sources.shape[1]:
        raise ValueError(f"inject_embeddings: weight must be [V,D] and sources [N,D] with the same D, "
                         f"got {tuple(weight.shape)} and {tuple(sources.shape)}")
    if not weight.is_floating_point() or weight.dtype != sources.dtype:
        raise ValueError(f"inject_embeddings: weight and sources must share a floating dtype, got "
                         f"{weight.dtype} and {sources.dtype}")
    devices = {t.device for t in (input_ids, weight, sources, source_index)}
    if len(devices) != 1:
        raise ValueError(f"inject_embeddings: all tensors must be on one device, got {sorted(map(str, devices))}")


def check_index_range(input_ids: torch.Tensor, source_index: torch.Tensor, num_embeddings: int,
                      num_sources: int) -> None:
    """IndexError if a token id (at token positions) or a source index is out of range."""
    if source_index.numel() == 0:
        return
    token_ids = input_ids.masked_fill(source_index >= 0, 0)  # ids at injected positions are never read
    lo, hi = torch.aminmax(token_ids)
    if int(lo) < 0 or int(hi) >= num_embeddings:
        raise IndexError(f"inject_embeddings: token id out of range [0, {num_embeddings}): "
                         f"min {int(lo)}, max {int(hi)}")
    max_src = int(source_index.max())
    if max_src >= num_sources:
        raise IndexError(f"inject_embeddings: source_index {max_src} out of range for {num_sources} sources")


def inject_embeddings_reference(input_ids: torch.Tensor, weight: torch.Tensor, sources: torch.Tensor,
                                source_index: torch.Tensor) -> torch.Tensor:
    """row (b,t) = sources[source_index[b,t]] if source_index[b,t] >= 0 else weight[input_ids[b,t]].

    Plain autograd ops with metadata and range checks (the test oracle; the range check is a sync on GPUs)."""
    validate_inputs(input_ids, weight, sources, source_index)
    check_index_range(input_ids, source_index, weight.shape[0], sources.shape[0])
    return inject_embeddings_torch(input_ids, weight, sources, source_index)


def inject_embeddings_torch(input_ids: torch.Tensor, weight: torch.Tensor, sources: torch.Tensor,
                            source_index: torch.Tensor) -> torch.Tensor:
    """The same rows in plain autograd ops, without checks or host reads (any device and float dtype)."""
    injected = source_index >= 0
    tokens = F.embedding(input_ids.masked_fill(injected, 0), weight)
    if sources.shape[0] == 0:  # nothing to inject (decoding steps)
        return tokens
    picked = sources.index_select(0, source_index.clamp_min(0).reshape(-1)).view_as(tokens)
    return torch.where(injected.unsqueeze(-1), picked, tokens)


_fused: Optional[Callable] = None


def use_fused(op: Optional[Callable]) -> None:
    """Route :func:`inject_embeddings` through `op` (mmcoconut.kernels does this on import); None: back to torch."""
    global _fused
    _fused = op


def inject_embeddings(input_ids: torch.Tensor, weight: torch.Tensor, sources: torch.Tensor,
                      source_index: torch.Tensor) -> torch.Tensor:
    """The model's embedding function: the fused op when plugged in, else :func:`inject_embeddings_torch`."""
    if _fused is not None:
        return _fused(input_ids, weight, sources, source_index)
    return inject_embeddings_torch(input_ids, weight, sources, source_index)
