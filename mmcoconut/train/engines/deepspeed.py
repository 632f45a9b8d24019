"""The DeepSpeed engine: deepspeed.initialize, its checkpoints, and the NaN-window skip through its overflow path.

Installed on the model here (the model knows no DeepSpeed): pass-count agreement between ranks (rank_agreement.py),
and under ZeRO-3 the gather of the partitioned embedding table, which the fused injection reads outside its module's
forward. train.compile, train.deferred_wgrad and train.gradient_checkpointing are constructor arguments.

Skipping the optimizer step of an accumulation window with a NaN/inf loss: on every rank, in every ZeRO stage
and precision, through DeepSpeed's own skipped-step path.

The trainer decides per window (one collective per optimizer step, step.py). For a bad window every rank
multiplies its last micro-batch loss by NaN before backward ("poison"): the gradients become non-finite and
DeepSpeed's overflow check skips the update, zeroes the gradients, counts `skipped_steps` and holds the lr
schedule, exactly as for an fp16 overflow. Which DeepSpeed optimizers check (deepspeed 0.19.8):
- ZeRO-1/2 (DeepSpeedZeroOptimizer): fp16 always; fp32 through the invalid grad norm (needs compute_grad_norm);
  bf16 only with `bf16.check_grad_overflow` (default true; forced on by prepare_ds_config).
- ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): invalid grad norm, any precision.
- ZeRO-0 fp16/bf16 (FP16_Optimizer) and bf16 with fp32 accumulation (BF16_Optimizer): always.
- ZeRO-0 fp32: the plain torch optimizer, no check. There the trainer reads the decision on the host before the
  last backward ("host" mode) and, for a bad window, makes that one `optimizer.step()` a no-op and sets the
  `overflow` attribute that DeepSpeed's engine reads after it (DeepSpeedEngine._take_model_step): the gradients
  are zeroed and the step counted as skipped, with the lr schedule held, as in DeepSpeed's own path.
tests/test_nonfinite_skip.py proves every combination.
"""
from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Optional

import torch

from mmcoconut.config import ConfigError

from . import ds_ops, rank_agreement
from .base import Engine, EngineSpec, reset_adam_state, resolve_compile

DEVICE, HOST = "device", "host"


class DeepSpeedEngine(Engine):
    """DeepSpeed's engine behind the seam (base.py). `ds`: the deepspeed.DeepSpeedEngine once wrapped."""

    def __init__(self, spec: EngineSpec, compile="off", deferred_wgrad: bool = True,
                 gradient_checkpointing: bool = False):
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        self.spec, self.ds_config, self.deferred_wgrad = spec, spec.ds_config, deferred_wgrad
        self.gradient_checkpointing = gradient_checkpointing
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.notes = prepare_ds_config(self.ds_config)
        self.zero3 = spec.zero_stage == 3
        # train.compile (auto | on | off) on the device DeepSpeed trains on: auto is on for CUDA (base.py)
        self.compile, note = resolve_compile(compile, get_accelerator().device_name(), gradient_checkpointing,
                                             self.zero3)
        self.notes += [note] if note else []
        self._hf_zero3 = hf_zero3_context(self.ds_config)  # ZeRO-3: alive while the model is built and after
        self.param_editor = zero3_param_editor if self.zero3 else None
        self.ds = None

    def wrap(self, model, scheduler_factory) -> "DeepSpeedEngine":
        """deepspeed.initialize with only trainable parameters in the optimizer (frozen CLIP stays out)."""
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from mmcoconut.kernels import backend_for

        if self.compile:
            model.enable_compile()  # train.compile (resolved): the per-pass LM calls under torch.compile
        model.deferred_wgrad = self.deferred_wgrad  # modeling/wgrad.py
        if self.gradient_checkpointing:
            model.set_gradient_checkpointing(True)  # per decoder layer and pass (non-reentrant); no deferred wgrad
        rank_agreement.install(model, stop_together=self.zero3)
        if self.zero3:  # deferred weight gradients and the half-precision frozen tower need whole weights
            model.deferred_wgrad = False
            model.vision_half_on_cuda = False
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.spec.precision)
        if self.zero3 and half is not None:
            # ZeRO-3 casts only what HfDeepSpeedConfig/zero.Init built (from_pretrained parts); modules created
            # outside it (projector) stay fp32 and break its single-dtype partitions: cast them here.
            for p in model.parameters():
                if not hasattr(p, "ds_id") and p.is_floating_point():
                    p.data = p.data.to(half)
        params = [p for p in model.parameters() if p.requires_grad]
        backend_for(get_accelerator().device_name())  # the injection op: built (one line) or loaded now, not in step 1
        ds_ops.prepare(self.ds_config)  # DeepSpeed's ops: no silent compile inside deepspeed.initialize
        self.ds, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=self.ds_config,
                                                lr_scheduler=scheduler_factory)
        if self.zero3 and hasattr(model, "gather_param"):  # an MMCoconut: its table is read outside a forward
            _gather_embedding_table(model)
        self.module, self.device = self.ds.module, self.ds.device
        self.mode = skip_mode(self.ds)
        self.host_decides_skip = self.mode == HOST
        return self

    # ---------------------------------------------------------------- a step
    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def forward(self, batch: dict):
        return self.ds(**batch)

    def backward_accumulate(self, loss) -> None:
        self.ds.backward(loss)
        self.ds.step()  # DeepSpeed steps only at the accumulation boundary

    def finish_window(self, sync, vec, loss, overflow: bool = False) -> Optional[dict]:
        return finish_window(self.ds, self.mode, sync, vec, loss, overflow)

    @property
    def global_steps(self) -> int:
        return self.ds.global_steps

    @property
    def skipped_steps(self) -> int:
        return self.ds.skipped_steps

    def grad_norm(self):
        return self.ds.get_global_grad_norm()

    def lr(self) -> float:
        return self.ds.get_lr()[0]

    def loss_scale(self) -> Optional[float]:
        return loss_scale(self.ds)

    def reset_optimizer_state(self) -> None:
        """The inner torch optimizer (`optimizer.optimizer` under ZeRO-1/2/3 and FP16_Optimizer; the optimizer
        itself under ZeRO-0 fp32) holds the Adam moments of the fp32 master partitions. Weights, fp16 loss scale
        and the lr schedule are kept."""
        reset_adam_state(getattr(self.ds.optimizer, "optimizer", self.ds.optimizer))

    def train(self) -> None:
        self.ds.train()  # from_pretrained returns eval-mode modules: dropout must be on from the first step

    def eval(self) -> None:
        self.ds.eval()

    @property
    def generation_ok(self) -> bool:
        return not self.zero3  # ZeRO-3 would need equal forward counts per rank in generation

    # ---------------------------------------------------------------- checkpoints and export
    def save(self, run_dir: Path, tag: str, client_state: dict) -> None:
        self.ds.save_checkpoint(str(run_dir), tag, client_state=client_state, exclude_frozen_parameters=True)

    def load(self, run_dir: Path, tag: str) -> dict:
        frozen = {n for n, p in self.module.named_parameters() if not p.requires_grad}

        def load_trainable(src, dst):  # frozen weights were excluded on save: they come from the pretrained model
            res = dst.load_state_dict(src, strict=False)
            missing = set(res.missing_keys) - frozen
            if missing or res.unexpected_keys:
                raise RuntimeError(f"checkpoint {run_dir / tag} does not match the model: missing "
                                   f"{sorted(missing)[:5]}, unexpected {sorted(res.unexpected_keys)[:5]}")

        path, client = self.ds.load_checkpoint(str(run_dir), tag, custom_load_fn=load_trainable)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {run_dir / tag}")
        return client

    def building_whole(self):
        return _hf_zero3_suspended(self._hf_zero3) if self._hf_zero3 is not None else contextlib.nullcontext()

    def full_state_dict(self) -> Optional[dict]:
        """Trainable parameters: DeepSpeed's fp32 master copy (safe_get_full_fp32_param; ZeRO-1/2/3 and bf16).
        Others (frozen, or ZeRO-0 without master copies): the module parameter, gathered under ZeRO-3, in fp32."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        module, rank0 = self.module, self.rank == 0
        persistent = set(module.state_dict().keys())
        out = {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None and hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.data.detach().clone()
            elif full is None:
                full = p.detach()
            if rank0:
                out[name] = full.float().cpu().clone()
        for name, b in module.named_buffers():
            if name in persistent and rank0:
                out[name] = b.detach().cpu().clone()
        return out if rank0 else None


@contextlib.contextmanager
def _hf_zero3_suspended(hf_config):
    """transformers builds partitioned (ZeRO-3) modules while an HfDeepSpeedConfig is alive: unset it meanwhile."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(hf_config)


def hf_zero3_context(ds_config: dict):
    """ZeRO-3 + Hugging Face: HfDeepSpeedConfig must exist (and stay referenced) before the model is built,
    so from_pretrained partitions weights at load time and keeps HF's init (see stack.md). None otherwise."""
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def zero3_param_editor(params):
    """For build_model under ZeRO-3: a context in which partitioned weights are whole and rank 0's edit is kept."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def _gather_embedding_table(model) -> None:
    """ZeRO-3 partitions the embedding table, which the model reads outside the table's own forward (the fused
    injection): register it as an external parameter of the model (before the first forward), so DeepSpeed gathers
    it for every forward and backward, and gather it by hand when generation reads it outside a forward (all ranks
    make the same calls)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    deepspeed.zero.register_external_parameter(model, model.lm.get_input_embeddings().weight)

    def gather_if_released(param) -> None:
        if getattr(param, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE:
            param.all_gather()

    model.gather_param = gather_if_released


def loss_scale(ds_engine) -> Optional[float]:
    """Current fp16 loss scale (ZeRO-1/2/3: optimizer.loss_scale, ZeRO-0: cur_scale); None without fp16."""
    if not ds_engine.fp16_enabled():
        return None
    opt = ds_engine.optimizer
    v = getattr(opt, "loss_scale", None)
    v = getattr(opt, "cur_scale", None) if v is None else v
    return float(v) if v is not None else None


# ---------------------------------------------------------------- the NaN-window skip (module doc)
def prepare_ds_config(ds_config: dict) -> list[str]:
    """Make DeepSpeed's overflow check cover non-finite gradients in this ds_config. Returns notes."""
    notes = []
    bf16 = ds_config.get("bf16", {})
    if bf16.get("enabled") and bf16.get("check_grad_overflow") is False:
        ds_config["bf16"] = dict(bf16, check_grad_overflow=True)
        notes.append("bf16.check_grad_overflow forced to true: steps with a NaN/inf loss must be skipped")
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) in (1, 2) and zero.get("compute_grad_norm") is False:
        raise ConfigError("ds_config zero_optimization.compute_grad_norm=false: DeepSpeed then cannot detect a "
                          "non-finite gradient to skip a step with a NaN/inf loss; remove the key")
    return notes


def skip_mode(engine) -> str:
    """DEVICE: a poisoned backward is skipped by DeepSpeed; HOST: plain torch optimizer (ZeRO-0 fp32)."""
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
                       "mmcoconut/train/engines/deepspeed.py for the supported combinations")


def finish_window(engine, mode: str, sync, vec, loss, overflow: bool = False):
    """Backward and step of the window's last micro-batch (vec: the step's reduced vector, step.py).
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
