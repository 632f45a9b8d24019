"""The pass layout of a batch, computed on the host: the latent forward reads no device data to plan its passes.

The training Collator calls :func:`plan_batch` on its CPU tensors and ships the result as ``batch["latent_plan"]``
(a :class:`LatentPlan`, moved with ``.to(device, non_blocking=True)`` like a tensor); ``MMCoconut.forward`` then
runs with zero device->host syncs. Without a plan (direct calls, generation) the model plans from a host copy of
``input_ids``. Pure torch + standard library (ships inside Hugging Face exports).

Layout for n passes after the cross-rank agreement (see latent.py for the semantics):
``bounds = [(0, start)] + [(start + i, start + i + 1) for i < n - 1] + [(start + n - 1, Tp)]`` (``[(0, Tp)]`` for
n = 0), where ``start`` is the first latent column (or ``max(T - n, 1)`` when the batch has no latents of its own)
and ``Tp = T + pad`` (masked right padding so that every rank makes n + 1 LM calls).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

from .loss import label_positions


@dataclass(frozen=True)
class Layout:
    """Host-side pass layout for a given pass count n."""
    n: int
    start: int
    pad: int
    Tp: int
    bounds: tuple[tuple[int, int], ...]


@dataclass
class LatentPlan:
    """What the multi-pass forward needs to know about a batch, decided on the host.

    T: batch width; first_latent: column of latent 0 of every row that has latents (0 if none does); m_local: most
    latents in a row; image_counts: <image> tokens per row; latent_counts [B] long and image_index [B,T] long (row of
    the flattened image features, -1 elsewhere; None without <image> tokens) travel to the device with `.to`, as
    label_index [K] long does: the flat positions b * T + t whose next label is not -100, the only rows the loss
    projects (loss.py; None when planned without labels: the model then finds them with a host read).
    """
    T: int
    first_latent: int
    m_local: int
    image_counts: tuple[int, ...]
    latent_counts: torch.Tensor
    image_index: Optional[torch.Tensor]
    label_index: Optional[torch.Tensor] = None

    def to(self, device=None, *args, non_blocking: bool = False, **kwargs) -> "LatentPlan":
        """Move the tensors (dtype arguments are ignored: all are int64)."""
        if device is None or isinstance(device, torch.dtype):
            return self
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, latent_counts=mv(self.latent_counts), image_index=mv(self.image_index),
                       label_index=mv(self.label_index))

    def pin_memory(self) -> "LatentPlan":
        """DataLoader(pin_memory=True) calls this on custom batch values."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return replace(self, latent_counts=pin(self.latent_counts), image_index=pin(self.image_index),
                       label_index=pin(self.label_index))

    def layout(self, n: int) -> Layout:
        T = self.T
        if self.m_local > 0:
            start, pad = self.first_latent, max(0, self.first_latent + n - T)  # pass n needs column start + n - 1
        else:  # no local latents but another rank has n: split at T - n (right-pad if T < n + 1)
            start, pad = max(T - n, 1), max(0, n + 1 - T)
        Tp = T + pad
        bounds = ((0, Tp),) if n == 0 else \
            ((0, start),) + tuple((start + i, start + i + 1) for i in range(n - 1)) + ((start + n - 1, Tp),)
        return Layout(n=n, start=start, pad=pad, Tp=Tp, bounds=bounds)


def _name_rows(rows: Sequence[int], keys: Optional[Sequence[str]]) -> str:
    return ", ".join(f"row {r}" + (f" (key {keys[r]!r})" if keys is not None and r < len(keys) else "")
                     for r in rows)


def plan_batch(input_ids: torch.Tensor, latent_id: int, image_id: int, prefix: Optional[int] = None,
               keys: Optional[Sequence[str]] = None, labels: Optional[torch.Tensor] = None) -> LatentPlan:
    """Plan a [B,T] batch (CPU tensor; host reads are free here). Only the first `prefix` columns (default all) are
    searched for <image>/<latent> (generated tokens are plain tokens). With `labels` [B,T] the plan also carries
    the labelled positions (label_index) for the loss. Raises ValueError naming rows (and keys)
    when the latents are not aligned, a latent sits at column 0, or rows differ in their number of <image> tokens."""
    ids = input_ids.detach().to("cpu")
    B, T = ids.shape
    is_img, is_lat = ids == image_id, ids == latent_id
    if prefix is not None and prefix < T:
        is_img[:, prefix:] = False
        is_lat[:, prefix:] = False
    counts = is_lat.sum(1)
    cols = is_lat.any(0).nonzero().flatten()
    l0 = int(cols[0]) if len(cols) else 0
    ar = torch.arange(T)
    expected = (ar >= l0) & (ar < l0 + counts[:, None])
    bad = (expected != is_lat).any(1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"latent tokens are not aligned in {_name_rows(bad, keys)}: every row's latents must be "
                         f"contiguous and start at the same column (first latent column {l0}, per-row counts "
                         f"{counts.tolist()}); use mmcoconut.data.collate.Collator / GenerationCollator")
    m_local = int(counts.max()) if B else 0
    if m_local > 0 and l0 == 0:
        raise ValueError(f"a latent token at column 0 has no preceding hidden state ({_name_rows([0], keys)})")
    img_counts = is_img.sum(1)
    image_index = None
    if bool(is_img.any()):
        per_row = int(img_counts.max())
        uneven = (img_counts != per_row).nonzero().flatten().tolist()
        if uneven:
            raise ValueError(f"every row needs the same number of <image> tokens; per-row counts "
                             f"{img_counts.tolist()} ({_name_rows(uneven, keys)} differ)")
        rank = is_img.long().cumsum(1) - 1 + torch.arange(B)[:, None] * per_row
        image_index = torch.where(is_img, rank, -1)
    label_index = None if labels is None else label_positions(labels.detach().to("cpu"))
    return LatentPlan(T=T, first_latent=l0, m_local=m_local, image_counts=tuple(img_counts.tolist()),
                      latent_counts=counts, image_index=image_index, label_index=label_index)
