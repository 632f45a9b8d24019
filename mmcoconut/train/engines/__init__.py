"""Training engines behind one seam (base.py): DeepSpeed ZeRO (deepspeed.py, the default) and PyTorch FSDP2
(fsdp.py), chosen by train.engine. resolve_spec() runs before any process group exists (every config problem
is one ConfigError on every rank); init_distributed() makes the process group; create_engine() the engine."""
from __future__ import annotations

from typing import Optional

from .base import Engine, EngineSpec


def resolve_spec(cfg, world: int, ds_path: Optional[str] = None) -> EngineSpec:
    """The engine's settings from the run config (and, for DeepSpeed, the ds_config file). Raises ConfigError."""
    if cfg.train.engine == "fsdp2":
        from .fsdp_config import fsdp_spec
        return fsdp_spec(cfg, world)
    from .ds_config import deepspeed_spec
    return deepspeed_spec(cfg, world, ds_path)


def init_distributed(spec: EngineSpec) -> None:
    """The default process group (env:// from the launcher, or the single-process environment)."""
    if spec.name == "fsdp2":
        from .fsdp import init_distributed as init_fsdp
        init_fsdp()
    else:
        from .ds_ops import init_distributed as init_ds
        init_ds()


def create_engine(spec: EngineSpec, cfg) -> Engine:
    """The engine, before the model exists (base.py, "two phases")."""
    t = cfg.train
    if spec.name == "fsdp2":
        from .fsdp import FSDP2Engine
        return FSDP2Engine(spec, cfg.train, compile=t.compile, deferred_wgrad=t.deferred_wgrad,
                           gradient_checkpointing=t.gradient_checkpointing)
    from .deepspeed import DeepSpeedEngine
    return DeepSpeedEngine(spec, compile=t.compile, deferred_wgrad=t.deferred_wgrad,
                           gradient_checkpointing=t.gradient_checkpointing)
