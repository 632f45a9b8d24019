"""Skipping the optimizer step of an accumulation window with a NaN/inf loss: on every rank, in every ZeRO stage
and precision, through DeepSpeed's own skipped-step path.

The loop decides per window (one collective per optimizer step, stepsync.py). For a bad window every rank
multiplies its last micro-batch loss by NaN before backward ("poison"): the gradients become non-finite and
DeepSpeed's overflow check skips the update, zeroes the gradients, counts `skipped_steps` and holds the lr
schedule, exactly as for an fp16 overflow. Which DeepSpeed optimizers check (deepspeed 0.19.8):
- ZeRO-1/2 (DeepSpeedZeroOptimizer): fp16 always; fp32 through the invalid grad norm (needs compute_grad_norm);
  bf16 only with `bf16.check_grad_overflow` (default true; forced on by prepare_ds_config).
- ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): invalid grad norm, any precision.
- ZeRO-0 fp16/bf16 (FP16_Optimizer) and bf16 with fp32 accumulation (BF16_Optimizer): always.
- ZeRO-0 fp32: the plain torch optimizer, no check. There the loop reads the decision on the host before the
  last backward ("host" mode) and, for a bad window, makes that one `optimizer.step()` a no-op and sets the
  `overflow` attribute that DeepSpeed's engine reads after it (DeepSpeedEngine._take_model_step): the gradients
  are zeroed and the step counted as skipped, with the lr schedule held, as in DeepSpeed's own path.
tests/test_nonfinite_skip.py proves every combination.
"""
from __future__ import annotations

DEVICE, HOST = "device", "host"


def prepare_ds_config(ds: dict) -> list[str]:
    """Make DeepSpeed's overflow check cover non-finite gradients in this ds_config. Returns notes."""
    from mmcoconut.config import ConfigError

    notes = []
    bf16 = ds.get("bf16", {})
    if bf16.get("enabled") and bf16.get("check_grad_overflow") is False:
        ds["bf16"] = dict(bf16, check_grad_overflow=True)
        notes.append("bf16.check_grad_overflow forced to true: steps with a NaN/inf loss must be skipped")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) in (1, 2) and zero.get("compute_grad_norm") is False:
        raise ConfigError("ds_config zero_optimization.compute_grad_norm=false: DeepSpeed then cannot detect a "
                          "non-finite gradient to skip a step with a NaN/inf loss; remove the key")
    return notes


def skip_mode(engine) -> str:
    """DEVICE: a poisoned backward is skipped by DeepSpeed; HOST: plain torch optimizer (ZeRO-0 fp32)."""
    import torch
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return DEVICE
    if isinstance(opt, DeepSpeedZeroOptimizer):
        if opt.check_grad_overflow or (opt.dtype != torch.bfloat16 and opt.compute_grad_norm):
            return DEVICE
    elif isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer, BF16_Optimizer)):  # unfused: torch's AdamW
        return DEVICE
    elif isinstance(opt, torch.optim.Optimizer) and engine.zero_optimization_stage() == 0:
        return HOST
    raise RuntimeError(f"mmcoconut cannot guarantee that a step with a NaN/inf loss is skipped with DeepSpeed "
                       f"optimizer {type(opt).__name__} (ZeRO-{engine.zero_optimization_stage()}); see "
                       "mmcoconut/train/nonfinite.py for the supported combinations")


def finish_window(engine, mode: str, sync, vec, loss, overflow: bool = False):
    """Backward and step of the window's last micro-batch (vec: the step's reduced vector, stepsync.py).
    DEVICE: backward(loss * 1 or NaN) without a host sync, DeepSpeed skips a poisoned step. HOST: the decision is
    read now; a bad window runs no last backward and its optimizer update is dropped (DeepSpeed then zeroes the
    gradients and counts the skip as for an overflow). Returns the values read (HOST) or None.
    overflow: backward(loss * inf) instead (debug: a genuine fp16 overflow, which DeepSpeed skips by itself)."""
    if mode == HOST:
        values = sync.read_now(vec)
        bad = values["n_bad"] > 0
        opt = engine.optimizer
        opt.overflow = bad  # read by DeepSpeedEngine._take_model_step: skipped_steps += 1, lr schedule held
        if not bad:
            engine.backward(loss * float("inf") if overflow else loss)
            engine.step()
            return values
        opt.step = lambda *args, **kwargs: None  # this one update is dropped (an instance attribute...)
        try:
            engine.step()
        finally:
            del opt.step  # (... removed again: the class's step is back)
        return values
    loss = loss * sync.poison(vec).to(loss.dtype)  # x * 1 == x exactly: numerics of a good step are unchanged
    engine.backward(loss * float("inf") if overflow else loss)
    engine.step()
    return None
