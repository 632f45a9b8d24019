"""Learning-rate schedule: linear warmup, then constant / linear / cosine decay to min_lr_ratio * lr.

Applied as a torch LambdaLR that DeepSpeed owns (passed as `lr_scheduler` to deepspeed.initialize), so it is
stepped once per optimizer step (DeepSpeed skips it on fp16-overflow steps) and saved in its checkpoints.
"""
from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr after `step` optimizer steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if schedule == "linear":
        shape = 1.0 - progress
    elif schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr_schedule {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def make_scheduler_factory(train_cfg, total_steps: int, stage_of_step=None):
    """A callable optimizer -> LambdaLR, the form deepspeed.initialize(lr_scheduler=...) accepts.
    stage_of_step(step) -> curriculum stage: from stage 1 on the factor is multiplied by train.latent_lr_ratio."""
    ratio = getattr(train_cfg, "latent_lr_ratio", 1.0)

    def fn(step: int) -> float:
        f = lr_factor(step, total_steps=total_steps, warmup_steps=train_cfg.warmup_steps,
                      schedule=train_cfg.lr_schedule, min_lr_ratio=train_cfg.min_lr_ratio)
        if ratio != 1.0 and stage_of_step is not None and stage_of_step(step) > 0:
            f *= ratio
        return f

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
