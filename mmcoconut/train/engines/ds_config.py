"""DeepSpeed config (ds_config) resolution and validation, before any process group exists.

resolve_ds_config() runs on every rank before any collective, so a config that does not fit the world size fails
on every rank with the same one-line error instead of hanging in a collective. On the CPU accelerator it picks
settings that compile nothing (ds_ops.cpu_defaults). The run config's switches that are not DeepSpeed's
(train.compile, train.deferred_wgrad) go to the engine's constructor (engines/deepspeed.py), not into the dict.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional

from mmcoconut.config import ConfigError

from . import ds_ops
from .base import EngineSpec

FP16_DEFAULTS = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1}
FP16_KNOBS = ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")


def ds_configs_dir() -> Path:
    """ds_configs/ of the source checkout (next to the package), else the copy installed with the package
    (mmcoconut/ds_configs in the wheel), else ./ds_configs."""
    pkg = Path(__file__).resolve().parents[2]
    for d in (pkg.parent / "ds_configs", pkg / "ds_configs"):
        if d.is_dir():
            return d
    return Path("ds_configs")


def find_ds_config(path: str) -> Path:
    """A ds_config file path, or the name of a shipped one: `zero2_2gpu` / `zero2_2gpu.json`."""
    p = Path(path)
    if not p.is_file() and p.parent == Path("."):
        named = ds_configs_dir() / (p.name if p.suffix == ".json" else f"{p.name}.json")
        if named.is_file():
            return named
    return p


def default_ds_config(world: int) -> Path:
    """ZeRO-0 on one GPU (no partitioning overhead), ZeRO-2 on several."""
    return ds_configs_dir() / ("zero0_1gpu.json" if world == 1 else f"zero2_{world}gpu.json")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _fitting_files(world: int, like: Optional[Path], global_batch: Optional[int] = None) -> list[tuple[str, int]]:
    """(path, global batch) of ds_configs/ files whose batch arithmetic fits `world`: those with `global_batch`
    first, then the same family (zero2, zero3_offload, ...) as `like`, top-level files before ds_configs/cpu/."""
    fits = []
    for p in sorted(ds_configs_dir().glob("**/*.json")):
        try:
            c = json.loads(p.read_text())
            if c["train_batch_size"] == (c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"]
                                         * world):
                fits.append((p, c["train_batch_size"]))
        except (ValueError, KeyError, TypeError):
            continue
    fam = lambda p: p.stem.rsplit("_", 1)[0]  # noqa: E731
    family = fam(like) if like is not None and any(fam(p) == fam(like) for p, _ in fits) else "zero2"
    fits.sort(key=lambda f: (f[1] != global_batch, fam(f[0]) != family, f[0].parent != ds_configs_dir()))
    return [(str(p), g) for p, g in fits]


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def resolve_ds_config(cfg, path: Optional[str] = None, world: Optional[int] = None) -> dict:
    """Load the ds_config file and apply the run config's overrides onto it. Raises ConfigError."""
    world = world or world_size()
    t = cfg.train
    path = path or t.deepspeed_config or str(default_ds_config(world))
    p = find_ds_config(path)
    if not p.is_file():
        hint = _fitting_files(world, None)
        raise ConfigError(f"ds_config {path}: no such file" + (f"; for {world} process(es) use {hint[0][0]}"
                                                               if hint else ""))
    try:
        ds_config = json.loads(p.read_text())
    except ValueError as e:
        raise ConfigError(f"ds_config {path}: invalid JSON: {e}") from None
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if not isinstance(ds_config.get(key), int):
            raise ConfigError(f"ds_config {path}: {key} must be a concrete integer (no \"auto\"), "
                              f"got {ds_config.get(key)!r}")
    glob_bs, micro, acc = ds_config["train_batch_size"], ds_config["train_micro_batch_size_per_gpu"], \
        ds_config["gradient_accumulation_steps"]
    if glob_bs != micro * acc * world and t.gradient_accumulation_steps is None:
        raise ConfigError(f"ds_config {path} does not fit {world} process(es): train_batch_size {glob_bs} != "
                          f"micro {micro} x accumulation {acc} x world {world}; "
                          + _mismatch_hint(world, p, glob_bs, micro))
    ds_config = copy.deepcopy(ds_config)

    # batch: a micro-batch override keeps the global batch and re-derives accumulation; with accumulation given too
    # (seed configs), the global batch follows from both
    if t.gradient_accumulation_steps is not None:
        micro = t.micro_batch_size or micro
        ds_config["train_micro_batch_size_per_gpu"] = micro
        ds_config["gradient_accumulation_steps"] = t.gradient_accumulation_steps
        ds_config["train_batch_size"] = micro * t.gradient_accumulation_steps * world
    elif t.micro_batch_size is not None and t.micro_batch_size != micro:
        micro = t.micro_batch_size
        if glob_bs % (micro * world):
            raise ConfigError(f"train.micro_batch_size={micro}: global batch {glob_bs} (from {path}) is not "
                              f"divisible by micro {micro} x world {world}")
        ds_config["train_micro_batch_size_per_gpu"] = micro
        ds_config["gradient_accumulation_steps"] = glob_bs // (micro * world)

    # optimizer hyper-parameters and clipping from the run config
    ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = ds_config["optimizer"].setdefault("params", {})
    params["lr"], params["weight_decay"] = t.lr, t.weight_decay
    ds_config["gradient_clipping"] = t.grad_clip

    # precision switch and fp16 loss-scaling knobs
    if t.precision is not None:
        fp16 = {**FP16_DEFAULTS, **ds_config.get("fp16", {})}
        fp16["enabled"] = t.precision == "fp16"
        ds_config["fp16"] = fp16
        ds_config["bf16"] = {**ds_config.get("bf16", {}), "enabled": t.precision == "bf16"}
    for knob in FP16_KNOBS:
        if getattr(t, knob) is not None:
            ds_config.setdefault("fp16", dict(FP16_DEFAULTS, enabled=False))[knob] = getattr(t, knob)
    if ds_config.get("fp16", {}).get("enabled") and ds_config.get("bf16", {}).get("enabled"):
        raise ConfigError(f"ds_config {path}: fp16 and bf16 are both enabled; pick one (train.precision=...)")
    ds_config.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    if zero_stage(ds_config) == 3 and cfg.model.latent_scale == "embedding":
        raise ConfigError(f"model.latent_scale=embedding does not work with ZeRO-3 ({path}): the partitioned "
                          "embedding table's row norms are not available; use ZeRO-0/1/2 or latent_scale=none")
    if t.compile == "on" and zero_stage(ds_config) == 3:  # auto resolves off under ZeRO-3 (engines/base.py)
        raise ConfigError(f"train.compile=on does not work with ZeRO-3 ({path}): its partitioned weights are "
                          "gathered by hooks that torch.compile cannot trace; use ZeRO-0/1/2")
    _check_device_support(ds_config, path)
    return ds_ops.cpu_defaults(ds_config)


def _mismatch_hint(world: int, p: Path, glob_bs: int, micro: int) -> str:
    """What to use instead, saying whether the global batch (and so the training recipe) stays the same."""
    keep = (f"set gradient_accumulation_steps {glob_bs // (micro * world)} in {p} (global batch {glob_bs} kept)"
            if glob_bs % (micro * world) == 0 else "")
    fits = _fitting_files(world, p, glob_bs)
    if fits and fits[0][1] == glob_bs:
        return f"use {fits[0][0]} (same global batch {glob_bs})" + (f", or {keep}" if keep else "")
    if keep:
        return keep + (f", or use {fits[0][0]} (global batch {fits[0][1]}, not {glob_bs})" if fits else "")
    if fits:
        return f"use {fits[0][0]} (global batch {fits[0][1]}, not {glob_bs})"
    return f"write a ds_config with train_batch_size = micro x accumulation x {world}"


def _check_device_support(ds_config: dict, path: str) -> None:
    """Say clearly what this machine cannot run instead of failing deep inside DeepSpeed."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    zero = ds_config.get("zero_optimization", {})
    if acc.device_name() == "cpu":
        for part in ("offload_optimizer", "offload_param"):
            if zero.get(part, {}).get("device") == "nvme":
                raise ConfigError(f"ds_config {path}: zero_optimization.{part}.device=nvme needs a GPU "
                                  "(async I/O); on CPU drop the offload block")
    if ds_config.get("fp16", {}).get("enabled") and not acc.is_fp16_supported():
        if acc.device_name() == "cpu" and os.environ.get("MMCOCONUT_CPU_FP16") == "1":
            # torch runs fp16 on any CPU (slowly, without oneDNN fp16); DeepSpeed only asks oneDNN. Opt-in, used
            # by the tests of dynamic loss scaling, which is device-independent logic.
            type(acc).is_fp16_supported = lambda self: True
        else:
            raise ConfigError(f"ds_config {path}: fp16 is not supported on this {acc.device_name()} (DeepSpeed "
                              "needs oneDNN fp16, e.g. AVX512-FP16/AMX); use --train.precision=bf16 or fp32"
                              + (", or set MMCOCONUT_CPU_FP16=1 to run torch's slow CPU fp16 path anyway"
                                 if acc.device_name() == "cpu" else ""))
    if ds_config.get("bf16", {}).get("enabled") and not acc.is_bf16_supported():
        raise ConfigError(f"ds_config {path}: bf16 is not supported on accelerator {acc.device_name()!r}; "
                          "use --train.precision=fp32 or fp16")


def precision_of(ds_config: dict) -> str:
    return "fp16" if ds_config.get("fp16", {}).get("enabled") else \
        "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32"


def deepspeed_spec(cfg, world: int, path: Optional[str] = None) -> EngineSpec:
    """The resolved ds_config as the engine's settings. Raises ConfigError."""
    ds_config = resolve_ds_config(cfg, path, world)
    return EngineSpec("deepspeed", world, ds_config["train_micro_batch_size_per_gpu"],
                      ds_config["gradient_accumulation_steps"], precision_of(ds_config), zero_stage(ds_config),
                      ds_config)


def enable_universal_load(ds_config: dict) -> None:
    """Resuming from a universal checkpoint (another world size) is a ds_config switch read at initialize."""
    ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
