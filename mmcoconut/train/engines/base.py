"""The engine seam: what the Trainer needs from a training engine (DeepSpeed, FSDP2), and the settings an engine
resolves from the run config before any process group exists (pre-flight and resume planning read them).

An engine is built in two phases, because some engines must exist before the model is (ZeRO-3 partitions weights
while they load): `engine = create_engine(spec, cfg)` (engines/__init__.py), then
`model = build_model(..., edit_params=engine.param_editor)`, then `engine.wrap(model, scheduler_factory)`.
A window of `accumulation` micro-batches is one optimizer step: `backward_accumulate(loss)` for every micro-batch
but the last, `finish_window(sync, vec, loss)` for the last (backward, skip decision, optimizer step).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch


@dataclass
class EngineSpec:
    """An engine's resolved settings (no process group needed)."""
    name: str  # deepspeed | fsdp2 (train.engine)
    world: int
    micro_batch_size: int
    accumulation: int
    precision: str  # fp32 | fp16 | bf16
    zero_stage: Optional[int] = None  # deepspeed
    ds_config: dict = field(default_factory=dict)  # deepspeed: the resolved ds_config (DeepSpeed reads it)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.accumulation * self.world

    def describe(self) -> str:
        return f"ZeRO-{self.zero_stage}" if self.name == "deepspeed" else "FSDP2"


class Engine(ABC):
    """A wrapped model with its optimizer, lr schedule and loss scaling; see the module doc for the call order."""
    spec: EngineSpec
    module: torch.nn.Module  # the model itself (MMCoconut), not a wrapper
    device: torch.device
    rank: int
    world: int
    notes: list  # what the engine changed in the settings, printed once at start (rank 0)
    param_editor: Optional[Callable] = None  # for build_model: a context in which a sharded weight is whole
    host_decides_skip: bool = False  # the NaN-window decision is read on the host before the last backward

    # ---------------------------------------------------------------- build
    @abstractmethod
    def wrap(self, model: torch.nn.Module, scheduler_factory: Callable) -> "Engine":
        """Take the built model: shard / wrap it, make the optimizer and the lr schedule (scheduler_factory:
        optimizer -> LambdaLR, schedule.py)."""

    # ---------------------------------------------------------------- a step
    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """dtype the floating inputs of a batch take."""

    @abstractmethod
    def forward(self, batch: dict):
        """The wrapped model's forward on a batch already on the device."""

    @abstractmethod
    def backward_accumulate(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch that is not the last of its window (gradients accumulate)."""

    @abstractmethod
    def finish_window(self, sync, vec: torch.Tensor, loss: torch.Tensor, overflow: bool = False) -> Optional[dict]:
        """Backward of the window's last micro-batch and the optimizer step, skipped on every rank when the
        reduced step vector `vec` (step.py) counts a NaN/inf loss on any rank: weights, optimizer state and lr
        schedule stay as they were, `skipped_steps` and `global_steps` advance. overflow (tests): backward
        (loss * inf), a genuine overflow the loss scaler must skip. Returns the values read on the host
        (host_decides_skip) or None."""

    @property
    @abstractmethod
    def global_steps(self) -> int:
        """Optimizer steps taken, skipped ones included."""

    @property
    @abstractmethod
    def skipped_steps(self) -> int: ...

    @abstractmethod
    def grad_norm(self):
        """Norm of the last step's gradients before clipping (a device tensor or a number; None if unknown)."""

    @abstractmethod
    def lr(self) -> float: ...

    @abstractmethod
    def loss_scale(self) -> Optional[float]:
        """fp16 dynamic loss scale; None without fp16."""

    @abstractmethod
    def reset_optimizer_state(self) -> None:
        """Coconut's reset at a curriculum stage change: Adam moments and step counts to zero, in place."""

    def generating(self):
        """A context around generation outside the model's forward (validation): sharded weights made whole."""
        return contextlib.nullcontext()

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    # ---------------------------------------------------------------- checkpoints and export
    @abstractmethod
    def save(self, run_dir: Path, tag: str, client_state: dict) -> None:
        """Every rank: weights, optimizer, lr schedule, loss scale and `client_state` into run_dir/tag."""

    @abstractmethod
    def load(self, run_dir: Path, tag: str) -> dict:
        """Every rank: restore what save() wrote; returns the client_state."""

    def checkpoint_meta(self) -> dict:
        """Engine fields of a checkpoint's META (index.py)."""
        return {"engine": self.spec.name, "zero_stage": self.spec.zero_stage,
                "micro_batch_size": self.spec.micro_batch_size}

    @abstractmethod
    def full_state_dict(self) -> Optional[dict]:
        """fp32 weights of the whole model on rank 0 (None elsewhere); every rank calls it."""

    def building_whole(self):
        """A context in which new modules are built whole on the host (the export's fresh model), whatever the
        engine arranged for its own model's construction."""
        return contextlib.nullcontext()

    @property
    def generation_ok(self) -> bool:
        """Whether validation may generate (MC/DA accuracy) with this engine."""
        return True


def reset_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero exp_avg/exp_avg_sq and the step counters in place: equals a freshly built AdamW (bias correction
    restarts) and keeps buffer identity, which ZeRO-3 / offload / DTensor shards rely on."""
    for state in optimizer.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                v.zero_()
            elif k == "step":
                state[k] = 0
    for group in optimizer.param_groups:
        if "step" in group:
            group["step"] = 0


def resolve_compile(setting, device_type: str, gradient_checkpointing: bool = False,
                    zero3: bool = False) -> tuple[bool, Optional[str]]:
    """train.compile ("auto" | "on" | "off"; a bool means on/off) on the device the engine trains on -> (compile,
    note). on/off stay as written (the config checks refuse "on" with gradient checkpointing or ZeRO-3). auto: on
    for CUDA, off on any other device; on CUDA also off, with one note, under gradient checkpointing or ZeRO-3."""
    if isinstance(setting, bool):
        setting = "on" if setting else "off"
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"train.compile: {setting!r} is not one of ['auto', 'on', 'off']")
    if setting != "auto":
        return setting == "on", None
    if device_type != "cuda":
        return False, None
    blockers = [why for why, on in (("train.gradient_checkpointing", gradient_checkpointing), ("ZeRO-3", zero3)) if on]
    if blockers:
        return False, (f"train.compile=auto resolves off on CUDA: it does not combine with {' and '.join(blockers)} "
                       "(train.compile=off says so without this note)")
    return True, None
