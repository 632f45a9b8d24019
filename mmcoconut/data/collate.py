"""Batch collation: Coconut's latent alignment for training and for generation prompts."""
from __future__ import annotations

import torch

from ..modeling.pass_plan import plan_batch
from ..modeling.tokens import SpecialIds
from .curriculum import IGNORE


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _stack_pixels(rows: list[dict]) -> torch.Tensor:
    return torch.stack([r["pixel_values"] for r in rows])


class Collator:
    """Training batches (Coconut's MyCollator): every row's first LATENT lands in the same column.

    rows: dicts with input_ids, labels (lists), n_latents, pixel_values [3,H,W], key.
    Rows are left-padded by (latest first-latent column - own first-latent column); rows without latents are
    not left-padded. Then everything is right-padded to the longest row. `latent_plan` is the host-side pass layout
    (mmcoconut.modeling.pass_plan.LatentPlan) that lets MMCoconut.forward run without device->host syncs; a batch that
    cannot be planned (misaligned latents, uneven <image> counts) raises ValueError naming the sample keys.
    """

    def __init__(self, ids: SpecialIds, pad_id: int):
        self.ids, self.pad_id = ids, pad_id

    def __call__(self, rows: list[dict]) -> dict:
        latent = self.ids.latent
        first = [r["input_ids"].index(latent) if latent in r["input_ids"] else None for r in rows]
        target = max((f for f in first if f is not None), default=0)
        left = [0 if f is None else target - f for f in first]
        width = max(lp + len(r["input_ids"]) for lp, r in zip(left, rows))
        B = len(rows)
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        labels = torch.full((B, width), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, (lp, r) in enumerate(zip(left, rows)):
            n = len(r["input_ids"])
            input_ids[b, lp:lp + n] = torch.tensor(r["input_ids"])
            labels[b, lp:lp + n] = torch.tensor(r["labels"])
            mask[b, lp:lp + n] = 1
        keys = [r["key"] for r in rows]
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "position_ids": _position_ids(mask), "pixel_values": _stack_pixels(rows),
                "keys": keys, "n_latents": torch.tensor([r["n_latents"] for r in rows]),
                "latent_plan": plan_batch(input_ids, self.ids.latent, self.ids.image, keys=keys, labels=labels)}


class GenerationCollator:
    """Eval prompts; `meta` = shard json dicts, `valid` flags, `n_latents` per row.

    Rows may carry different latent counts (Coconut's per-sample rule): as in training, every row that has latents
    is left-padded so that its first LATENT lands in one column, then right-padded with masked pad columns so
    that all rows end at the same column; rows without latents are left-padded to that end. Without latents
    this is plain left padding. `model.generate` starts each row from its last real (mask 1) column.
    """

    def __init__(self, ids: SpecialIds, pad_id: int):
        self.ids, self.pad_id = ids, pad_id

    def __call__(self, rows: list[dict]) -> dict:
        latent = self.ids.latent
        first = [r["input_ids"].index(latent) if latent in r["input_ids"] else None for r in rows]
        target = max((f for f in first if f is not None), default=0)
        left = [None if f is None else target - f for f in first]
        width = max((lp if lp is not None else 0) + len(r["input_ids"]) for lp, r in zip(left, rows))
        B = len(rows)
        input_ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.long)
        for b, (lp, r) in enumerate(zip(left, rows)):
            n = len(r["input_ids"])
            lp = width - n if lp is None else lp
            input_ids[b, lp:lp + n] = torch.tensor(r["input_ids"])
            mask[b, lp:lp + n] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": _position_ids(mask),
                "pixel_values": _stack_pixels(rows), "keys": [r["key"] for r in rows],
                "n_latents": torch.tensor([r["n_latents"] for r in rows]),
                "meta": [r["meta"] for r in rows], "valid": [bool(r.get("valid", True)) for r in rows]}
