"""FSDP2's settings from the run config alone (no ds_config): batch, precision, sharding. Checked before any
process group exists, like the ds_config (one ConfigError on every rank).

  train.micro_batch_size           per-rank batch (default 4)
  train.gradient_accumulation_steps  micro-batches per optimizer step; default: train.global_batch_size /
                                   (micro x world) when that is set, else 1
  train.global_batch_size          micro x accumulation x world (keeps the recipe when the world size changes)
  train.precision                  fp32 (default) | bf16 | fp16 (MixedPrecisionPolicy: parameters gathered in that
                                   dtype, gradients reduced in fp32; fp16 with dynamic loss scaling through
                                   ShardedGradScaler: train.initial_scale_power, loss_scale_window, min_loss_scale)
  train.fsdp_reshard_after_forward  free each decoder block's gathered weights after its forward (ZeRO-3-like
                                   memory); false keeps them until the backward (ZeRO-2-like, less communication)
  train.gradient_checkpointing     (both engines) recompute every decoder layer of every pass in the backward
"""
from __future__ import annotations

from mmcoconut.config import ConfigError

from .base import EngineSpec

DEFAULT_MICRO_BATCH = 4


def fsdp_spec(cfg, world: int) -> EngineSpec:
    t = cfg.train
    micro = t.micro_batch_size or DEFAULT_MICRO_BATCH
    if t.gradient_accumulation_steps is not None:
        acc = t.gradient_accumulation_steps
        if t.global_batch_size is not None and t.global_batch_size != micro * acc * world:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} != micro {micro} x "
                              f"gradient_accumulation_steps {acc} x world {world}; set only two of the three")
    elif t.global_batch_size is not None:
        if t.global_batch_size % (micro * world):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by micro {micro} x "
                              f"world {world}; set train.micro_batch_size so that it is")
        acc = t.global_batch_size // (micro * world)
    else:
        acc = 1
    if t.hysteresis is not None:
        raise ConfigError("train.hysteresis is DeepSpeed's (overflows tolerated before the loss scale halves); "
                          "FSDP2's ShardedGradScaler halves at every overflow: remove it for train.engine=fsdp2")
    if t.deepspeed_config:
        raise ConfigError(f"a ds_config ({t.deepspeed_config}) was given with train.engine=fsdp2, which reads its "
                          "batch and precision from the run config (docs/engines.md): drop --deepspeed (launch.sh: "
                          "ENGINE=fsdp2 or --train.engine=fsdp2 on its command line starts torchrun without one)")
    return EngineSpec("fsdp2", world, micro, acc, t.precision or "fp32")
