"""DeepSpeed config resolution/validation and engine construction.

resolve_ds_config() runs before any process group exists, so a config that does not fit the world size fails
on every rank with the same one-line error instead of hanging in a collective. On the CPU accelerator it picks
settings that compile nothing (ds_ops.cpu_defaults); init_distributed() and initialize() build or load
DeepSpeed's ops through the keyed cache with one line per first build (ds_ops).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional

from mmcoconut.config import ConfigError, TrainConfig

from . import ds_ops

FP16_DEFAULTS = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1}
FP16_KNOBS = ("initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")
MMCOCONUT_KEY = "mmcoconut"  # run-config switches carried in the resolved ds dict to initialize()
TRAIN_SWITCHES = ("compile", "deferred_wgrad", "gradient_checkpointing")  # train.* to initialize() unless default


def ds_configs_dir() -> Path:
    """ds_configs/ of the source checkout (next to the package), else the copy installed with the package
    (mmcoconut/ds_configs in the wheel), else ./ds_configs."""
    pkg = Path(__file__).resolve().parents[1]
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


def _zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


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
        ds = json.loads(p.read_text())
    except ValueError as e:
        raise ConfigError(f"ds_config {path}: invalid JSON: {e}") from None
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if not isinstance(ds.get(key), int):
            raise ConfigError(f"ds_config {path}: {key} must be a concrete integer (no \"auto\"), "
                              f"got {ds.get(key)!r}")
    glob_bs, micro, acc = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], \
        ds["gradient_accumulation_steps"]
    if glob_bs != micro * acc * world and t.gradient_accumulation_steps is None:
        raise ConfigError(f"ds_config {path} does not fit {world} process(es): train_batch_size {glob_bs} != "
                          f"micro {micro} x accumulation {acc} x world {world}; "
                          + _mismatch_hint(world, p, glob_bs, micro))
    ds = copy.deepcopy(ds)

    # batch: a micro-batch override keeps the global batch and re-derives accumulation; with accumulation given too
    # (seed configs), the global batch follows from both
    if t.gradient_accumulation_steps is not None:
        micro = t.micro_batch_size or micro
        ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = micro, t.gradient_accumulation_steps
        ds["train_batch_size"] = micro * t.gradient_accumulation_steps * world
    elif t.micro_batch_size is not None and t.micro_batch_size != micro:
        micro = t.micro_batch_size
        if glob_bs % (micro * world):
            raise ConfigError(f"train.micro_batch_size={micro}: global batch {glob_bs} (from {path}) is not "
                              f"divisible by micro {micro} x world {world}")
        ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = micro, glob_bs // (micro * world)

    # optimizer hyper-parameters and clipping from the run config
    ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = ds["optimizer"].setdefault("params", {})
    params["lr"], params["weight_decay"] = t.lr, t.weight_decay
    ds["gradient_clipping"] = t.grad_clip

    # precision switch and fp16 loss-scaling knobs
    if t.precision is not None:
        fp16 = {**FP16_DEFAULTS, **ds.get("fp16", {})}
        fp16["enabled"] = t.precision == "fp16"
        ds["fp16"] = fp16
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": t.precision == "bf16"}
    for knob in FP16_KNOBS:
        if getattr(t, knob) is not None:
            ds.setdefault("fp16", dict(FP16_DEFAULTS, enabled=False))[knob] = getattr(t, knob)
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError(f"ds_config {path}: fp16 and bf16 are both enabled; pick one (train.precision=...)")
    ds.setdefault("steps_per_print", 10 ** 9)  # we log ourselves
    if _zero_stage(ds) == 3 and cfg.model.latent_scale == "embedding":
        raise ConfigError(f"model.latent_scale=embedding does not work with ZeRO-3 ({path}): the partitioned "
                          "embedding table's row norms are not available; use ZeRO-0/1/2 or latent_scale=none")
    if t.compile and _zero_stage(ds) == 3:
        raise ConfigError(f"train.compile=true does not work with ZeRO-3 ({path}): its partitioned weights are "
                          "gathered by hooks that torch.compile cannot trace; use ZeRO-0/1/2")
    opts = {k: getattr(t, k) for k in TRAIN_SWITCHES if getattr(t, k) != getattr(TrainConfig, k)}
    if opts:
        ds[MMCOCONUT_KEY] = opts  # read (and removed) by initialize(); DeepSpeed never sees it
    _check_device_support(ds, path)
    return ds_ops.cpu_defaults(ds)


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


def _check_device_support(ds: dict, path: str) -> None:
    """Say clearly what this machine cannot run instead of failing deep inside DeepSpeed."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    zero = ds.get("zero_optimization", {})
    if acc.device_name() == "cpu":
        for part in ("offload_optimizer", "offload_param"):
            if zero.get(part, {}).get("device") == "nvme":
                raise ConfigError(f"ds_config {path}: zero_optimization.{part}.device=nvme needs a GPU "
                                  "(async I/O); on CPU drop the offload block")
    if ds.get("fp16", {}).get("enabled") and not acc.is_fp16_supported():
        if acc.device_name() == "cpu" and os.environ.get("MMCOCONUT_CPU_FP16") == "1":
            # torch runs fp16 on any CPU (slowly, without oneDNN fp16); DeepSpeed only asks oneDNN. Opt-in, used
            # by the tests of dynamic loss scaling, which is device-independent logic.
            type(acc).is_fp16_supported = lambda self: True
        else:
            raise ConfigError(f"ds_config {path}: fp16 is not supported on this {acc.device_name()} (DeepSpeed "
                              "needs oneDNN fp16, e.g. AVX512-FP16/AMX); use --train.precision=bf16 or fp32"
                              + (", or set MMCOCONUT_CPU_FP16=1 to run torch's slow CPU fp16 path anyway"
                                 if acc.device_name() == "cpu" else ""))
    if ds.get("bf16", {}).get("enabled") and not acc.is_bf16_supported():
        raise ConfigError(f"ds_config {path}: bf16 is not supported on accelerator {acc.device_name()!r}; "
                          "use --train.precision=fp32 or fp16")


def precision_of(ds: dict) -> str:
    return "fp16" if ds.get("fp16", {}).get("enabled") else "bf16" if ds.get("bf16", {}).get("enabled") else "fp32"


def hf_zero3_context(ds: dict):
    """ZeRO-3 + Hugging Face: HfDeepSpeedConfig must exist (and stay referenced) before the model is built,
    so from_pretrained partitions weights at load time and keeps HF's init (see stack.md). None otherwise."""
    if _zero_stage(ds) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds)


def initialize(model, ds: dict, lr_scheduler_factory):
    """deepspeed.initialize with only trainable parameters in the optimizer (frozen CLIP stays out)."""
    import deepspeed
    import torch

    from . import rank_agreement

    ds = dict(ds)
    opts = ds.pop(MMCOCONUT_KEY, {})
    if opts.get("compile"):
        model.enable_compile()  # train.compile: the per-pass LM calls under torch.compile
    model.deferred_wgrad = opts.get("deferred_wgrad", TrainConfig.deferred_wgrad)  # modeling/wgrad.py
    if opts.get("gradient_checkpointing"):
        model.set_gradient_checkpointing(True)  # per decoder layer and pass (non-reentrant); no deferred wgrad
    zero3 = _zero_stage(ds) == 3
    rank_agreement.install(model, stop_together=zero3)
    if zero3:  # deferred weight gradients and the half-precision frozen tower need whole weights
        model.deferred_wgrad = False
        model.vision_half_on_cuda = False
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision_of(ds))
    if zero3 and half is not None:
        # ZeRO-3 casts only what HfDeepSpeedConfig/zero.Init built (from_pretrained parts); modules created
        # outside it (projector) stay fp32 and break its single-dtype partitions: cast them here.
        for p in model.parameters():
            if not hasattr(p, "ds_id") and p.is_floating_point():
                p.data = p.data.to(half)
    from deepspeed.accelerator import get_accelerator

    from mmcoconut.kernels import backend_for

    params = [p for p in model.parameters() if p.requires_grad]
    backend_for(get_accelerator().device_name())  # the injection op: built (one line) or loaded now, not in step 1
    ds_ops.prepare(ds)  # DeepSpeed's ops: no silent compile inside deepspeed.initialize
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds,
                                           lr_scheduler=lr_scheduler_factory)
    if zero3:
        _gather_embedding_table(model)
    return engine


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


def zero3_param_editor(ds: dict):
    """For build_model under ZeRO-3: a context in which partitioned weights are whole and rank 0's edit is kept."""
    if _zero_stage(ds) != 3:
        return None
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def loss_scale(engine) -> Optional[float]:
    """Current fp16 loss scale (ZeRO-1/2/3: optimizer.loss_scale, ZeRO-0: cur_scale); None without fp16."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    v = getattr(opt, "loss_scale", None)
    v = getattr(opt, "cur_scale", None) if v is None else v
    return float(v) if v is not None else None


def reset_optimizer_state(engine) -> None:
    """Coconut's reset_optimizer at a stage change, without rebuilding the engine.

    The inner torch optimizer (`engine.optimizer.optimizer` under ZeRO-1/2/3 and FP16_Optimizer; the optimizer
    itself under ZeRO-0 fp32) holds Adam moments for the fp32 master partitions. Zeroing exp_avg/exp_avg_sq and
    the step counters in place equals a freshly built AdamW (bias correction restarts) and keeps buffer identity,
    which ZeRO-3 / offload rely on. Weights, fp16 loss scale and the lr schedule are kept.
    """
    import torch

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        for k, v in state.items():
            if torch.is_tensor(v):
                v.zero_()
            elif k == "step":
                state[k] = 0
    for group in inner.param_groups:
        if "step" in group:
            group["step"] = 0
