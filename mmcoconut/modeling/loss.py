"""Token cross-entropy on the labelled positions only: gather their hidden states, then project (lm_head), chunked.

Today's formula, kept as :func:`full_logits_loss` (the reference of the tests and of bench/bench_loss.py)::

    logits = head(hidden)                                      # [B, T, V]
    CE(logits[:, :-1].float(), labels[:, 1:], ignore -100, sum) / #(labels[:, 1:] != -100)

:func:`labelled_cross_entropy` computes the same number without [B, T, V] logits: the K positions t whose next
label is not -100 are gathered (index_select of [K, D] rows), the output embedding runs on them in chunks of
`chunk_rows` rows, and each chunk's logits are recomputed in backward (non-reentrant checkpoint) instead of being
kept, so autograd keeps [K, D] plus one chunk's [rows, V] logits at a time, never a [B, T, V] tensor.

The positions come from the host (the Collator's `LatentPlan.label_index`, see pass_plan.py), so the training
forward reads no device data; without them they are found with one host read (:func:`label_positions`).
A superset of the labelled positions gives the same loss (targets of -100 are ignored and not counted).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_BYTES = 1 << 28  # fp32 logits of one chunk: rows = CHUNK_BYTES // (4 V) (1335 rows for GPT-2's 50k vocab)


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """[K] int64 flat positions b * T + t (t < T - 1) whose next label labels[b, t + 1] is not -100, in order.
    A host read (nonzero) where labels live on a GPU; free on CPU tensors (the Collator)."""
    B, T = labels.shape
    has_next = torch.zeros_like(labels, dtype=torch.bool)
    has_next[:, :-1] = labels[:, 1:] != IGNORE
    return has_next.flatten().nonzero().flatten()


def full_logits_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The [B, T, V]-logits formula (HF shift, -100 ignored, mean over labelled tokens, fp32)."""
    lbl = labels[:, 1:].reshape(-1)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), lbl, ignore_index=IGNORE,
                         reduction="sum")
    return ce / (lbl != IGNORE).sum().clamp_min(1)


def _chunk_ce(head: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), target, ignore_index=IGNORE, reduction="sum")


def chunk_rows_for(head: nn.Module) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about CHUNK_BYTES."""
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    return max(1, CHUNK_BYTES // (4 * vocab))


def labelled_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                           positions: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None,
                           check: bool = False) -> torch.Tensor:
    """Mean token CE of `head` (the LM's output embedding) over the labelled positions of hidden [B, T, D].

    positions: label_positions(labels) computed on the host (or any superset of them); None: computed here (a
    host read). check: compare given positions with the labels (a host read; debug mode) and raise ValueError."""
    B, T, D = hidden.shape
    if tuple(labels.shape) != (B, T):
        raise ValueError(f"labels must be [B, T] = {[B, T]} like the hidden states, got {list(labels.shape)}")
    if positions is None:
        positions = label_positions(labels)
    else:
        positions = positions.to(hidden.device, non_blocking=True)
        if check and not torch.equal(positions.cpu(), label_positions(labels).cpu()):
            raise ValueError("latent_plan.label_index does not match labels (labels changed after collation?); "
                             "re-collate, or drop the plan's label_index")
    target = labels.reshape(B * T).index_select(0, positions + 1)  # the label after each position
    rows = hidden.reshape(B * T, D).index_select(0, positions)  # [K, D]: the only rows projected
    if rows.shape[0] == 0:  # nothing labelled: a zero that still reaches the head's parameters
        total = head(rows).float().sum()
    else:
        grad = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in head.parameters()))
        n, total = chunk_rows or chunk_rows_for(head), None
        for h, y in zip(rows.split(n), target.split(n)):
            part = checkpoint(_chunk_ce, head, h, y, use_reentrant=False, preserve_rng_state=False) if grad \
                else _chunk_ce(head, h, y)
            total = part if total is None else total + part
    return total / (target != IGNORE).sum().clamp_min(1)
