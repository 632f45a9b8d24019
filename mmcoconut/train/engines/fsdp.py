"""The FSDP2 engine: PyTorch `fully_shard` (torch.distributed.fsdp), torch's AdamW, DCP checkpoints.

Sharding: `fully_shard` on every decoder block, every vision-encoder layer, the projector, and the root (the rest
of the model: embeddings, final norm, tied LM head, vision embeddings). The root's parameters are unsharded for the
whole of the root's forward, so the fused injection, which reads the embedding table outside the table's own
module, sees the whole table (tests/test_fsdp.py checks it against the unsharded model); generation outside a
forward (validation) runs inside `generating()`, which unshards the root. Every rank makes the same number of LM
calls per micro-batch (rank_agreement: the blocks' all-gathers are collectives) and stops generating together.

Precision: MixedPrecisionPolicy (parameters gathered in bf16/fp16, gradients reduced in fp32, fp32 master
shards); fp16 with dynamic loss scaling through ShardedGradScaler. Gradients of the micro-batches of a window
accumulate unsharded (`set_requires_gradient_sync(False)`) and are reduce-scattered once, at the last backward.
NaN-window skip: the reduced step vector is read on the host before the last backward (host_decides_skip); a bad
window still runs its backward (so no unsharded gradient is left behind), then its gradients are dropped: no
optimizer or lr-schedule step, `skipped_steps` and `global_steps` advance, and in fp16 the loss scale backs off,
as under DeepSpeed. fp16 overflows (finite loss, inf gradient) are skipped by the grad scaler, counted the same way.
Options: train.gradient_checkpointing, the model's own (every decoder layer of every pass, non-reentrant, inside
the block's FSDP hooks: a recompute gathers the block again and reads the cache view of its pass); train.compile
(auto: on for CUDA unless gradient checkpointing) compiles every decoder block (training mode; FSDP2's hooks stay
outside the graphs), not the whole per-pass LM call as under DeepSpeed; with either, train.deferred_wgrad is off
(it is eager-only).
Checkpoints: torch.distributed.checkpoint of the model and optimizer (frozen weights excluded), resharded on load
(any world size), plus `client_state.pt` from rank 0 (train state, every rank's stream, lr schedule, loss scale).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mmcoconut.export.dcp_checkpoint import CLIENT_STATE

from . import rank_agreement
from .base import Engine, EngineSpec, reset_adam_state, resolve_compile

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # as in ds_configs/


def init_distributed() -> None:
    """gloo on CPU, NCCL on CUDA (one GPU per local rank); env:// from the launcher (or cli/train.py)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


class FSDP2Engine(Engine):
    host_decides_skip = True

    def __init__(self, spec: EngineSpec, train_cfg, compile="off", deferred_wgrad: bool = True,
                 gradient_checkpointing: bool = False):
        self.spec, self.t, self.deferred_wgrad = spec, train_cfg, deferred_wgrad
        self.gradient_checkpointing = gradient_checkpointing
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(spec.precision)
        self.compile, note = resolve_compile(compile, self.device.type, gradient_checkpointing)  # auto: on for CUDA
        self.notes = [note] if note else []
        self._steps = self._skipped = 0
        self._norm = None

    def wrap(self, model, scheduler_factory) -> "FSDP2Engine":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        from mmcoconut.kernels import backend_for

        t = self.t
        rank_agreement.install(model, stop_together=True)
        model.vision_half_on_cuda = False
        model.deferred_wgrad = self.deferred_wgrad and not (self.gradient_checkpointing or self.compile)
        if self.deferred_wgrad and not model.deferred_wgrad:  # (eager only: wgrad.py)
            self.notes.append("train.deferred_wgrad is off under gradient checkpointing and train.compile")
        blocks = _decoder_blocks(model)
        if self.gradient_checkpointing:  # the model's own: per decoder layer and pass, non-reentrant (families.py)
            model.set_gradient_checkpointing(True)
        if self.compile:
            for block in blocks:
                _compile_in_training(block)
        mesh = init_device_mesh(self.device.type, (self.world,))
        mp = MixedPrecisionPolicy(param_dtype=self.half, reduce_dtype=torch.float32) if self.half else \
            MixedPrecisionPolicy()
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=t.fsdp_reshard_after_forward)
        for unit in _vision_layers(model) + [m for m in [getattr(model, "projector", None)] if m is not None]:
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        # the projector's output is a view of a Linear's; the model applies no in-place op to it (the warning's worry)
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPSequential\) returned a view")
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self.module = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        fp16 = self.spec.precision == "fp16"  # the grad scaler's fused-optimizer path does not take DTensor shards
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                           weight_decay=t.weight_decay, fused=not fp16, foreach=fp16 or None)
        self.scheduler = scheduler_factory(self.optimizer)
        self.scaler = ShardedGradScaler(device=self.device.type, init_scale=2.0 ** (t.initial_scale_power or 16),
                                        growth_interval=t.loss_scale_window or 1000,
                                        enabled=fp16)
        backend_for(self.device.type)  # the injection op: built (one line) or loaded now, not in step 1
        return self

    # ---------------------------------------------------------------- a step
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # inputs are cast to the compute dtype by the mixed-precision policy

    def forward(self, batch: dict):
        return self.module(**batch)

    def _backward(self, loss, last: bool) -> None:
        self.module.set_requires_gradient_sync(last)
        self.scaler.scale(loss / self.spec.accumulation).backward()

    def backward_accumulate(self, loss) -> None:
        self._backward(loss, last=False)

    def finish_window(self, sync, vec, loss, overflow: bool = False) -> Optional[dict]:
        values = sync.read_now(vec)
        self._backward(loss * float("inf") if overflow else loss, last=True)
        if values["n_bad"] > 0:  # a NaN/inf loss on some rank: the whole window is dropped
            self._norm, skipped = None, True
            if self.scaler.is_enabled():  # fp16: as DeepSpeed (a non-finite gradient), the loss scale backs off
                self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
        else:
            skipped = self._optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        self._steps += 1
        self._skipped += skipped
        if not skipped:
            self.scheduler.step()
        return values

    def _optimizer_step(self) -> bool:
        """Unscale, clip, step; returns whether the grad scaler skipped the step (fp16 overflow)."""
        self.scaler.unscale_(self.optimizer)
        clip = self.t.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"), foreach=True)
        self._norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return False
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        after = self.scaler.get_scale()
        if self.t.min_loss_scale is not None and after < self.t.min_loss_scale:
            self.scaler.update(new_scale=float(self.t.min_loss_scale))
        return after < before

    @property
    def global_steps(self) -> int:
        return self._steps

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    def grad_norm(self):
        return self._norm

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def loss_scale(self) -> Optional[float]:
        return self.scaler.get_scale() if self.scaler.is_enabled() else None

    def reset_optimizer_state(self) -> None:
        reset_adam_state(self.optimizer)

    @contextlib.contextmanager
    def generating(self):
        self.module.unshard()  # the root's weights (embedding table, LM head) are read outside a forward
        try:
            yield
        finally:
            self.module.reshard()

    # ---------------------------------------------------------------- checkpoints and export
    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer,
                                      options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model, "optimizer": optim}

    def save(self, run_dir: Path, tag: str, client_state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        from ..checkpoint.index import atomic_write

        from torch.distributed.checkpoint.api import CheckpointException

        try:
            dcp.save(self._state(), checkpoint_id=str(run_dir / tag))
        except CheckpointException as e:  # a BaseException carrying each failed rank's: raise the first one's
            failure = next(iter(e.failures.values()), None)
            raise (failure[0] if isinstance(failure, tuple) else RuntimeError(str(e))) from e
        if self.rank == 0:
            engine = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                      "global_steps": self._steps, "skipped_steps": self._skipped}
            torch.save({**client_state, "engine": engine}, run_dir / tag / CLIENT_STATE)
            atomic_write(run_dir / "latest", tag)  # as DeepSpeed's: the export tools find the newest tag by it

    def load(self, run_dir: Path, tag: str) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=str(run_dir / tag))
        res = set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                             optim_state_dict=state["optimizer"],
                             options=StateDictOptions(ignore_frozen_params=True, strict=False))
        frozen = {n for n, p in self.module.named_parameters() if not p.requires_grad}
        missing = set(res.missing_keys) - frozen  # frozen weights are not saved: they come from the pretrained model
        if missing or res.unexpected_keys:
            raise RuntimeError(f"checkpoint {run_dir / tag} does not match the model: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(res.unexpected_keys)[:5]}")
        client = torch.load(run_dir / tag / CLIENT_STATE, map_location="cpu", weights_only=False)
        engine = client.pop("engine")
        self.scheduler.load_state_dict(engine["scheduler"])
        self.scaler.load_state_dict(engine["scaler"])
        self._steps, self._skipped = engine["global_steps"], engine["skipped_steps"]
        return client

    def full_state_dict(self) -> Optional[dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _decoder_blocks(model) -> list:
    """The LM's decoder blocks, any family (families.decoder_layers, kept by MMCoconut); none for a model that is not
    an MMCoconut: then only the root is sharded."""
    return list(getattr(model, "_decoder_layers", []))


def _vision_layers(model) -> list:
    """The vision tower's encoder layers (sharded one by one; the tower's own class is left unwrapped: Hugging
    Face's output capture of hidden states does not survive fully_shard's class swap on the tower itself)."""
    vision = getattr(model, "vision", None)
    encoder = getattr(vision, "encoder", None) or getattr(getattr(vision, "vision_model", None), "encoder", None)
    return list(getattr(encoder, "layers", []))


def _compile_in_training(block) -> None:
    """torch.compile the block's forward for training passes (fixed few shapes); generation stays eager."""
    eager = block.forward
    compiled = torch.compile(eager, fullgraph=True)

    def forward(*args, **kwargs):
        return compiled(*args, **kwargs) if block.training and torch.is_grad_enabled() else eager(*args, **kwargs)

    block.forward = forward
