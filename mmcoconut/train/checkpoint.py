"""Checkpoints: DeepSpeed's save/load plus the glue to resume a run exactly.

Layout of a run dir: `<run_dir>/<tag>/` (DeepSpeed's files, tag = step00000040 | epoch002), DeepSpeed's `latest`
(not used for resuming), and two side files written by rank 0 after a barrier via temp file + rename (index.py):
`<run_dir>/<tag>/mmcoconut.json` (world size, ZeRO stage, step, epoch, resolved config, every file's size: the
completeness marker) and `<run_dir>/checkpoints.json` (complete tags in save order, for keep_last and `resume: auto`).
client_state: train counters, the resolved config, code version, and every rank's loader state + RNG states
(all-gathered: DeepSpeed writes client_state only from rank 0's model-states file).
A save that fails (disk full, ...) raises TrainError naming the tag and the free space; the partial tag dir is
removed and the previous checkpoint stays as it was.
"""
from __future__ import annotations

import errno
import random
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import mmcoconut
from mmcoconut.config import ConfigError
from mmcoconut.model_paths import resolved_section

from . import drift
from .index import UNIVERSAL_SUFFIX, fix_latest, list_tags, prune, read_meta, write_meta


class TrainError(RuntimeError):
    """A run-stopping condition with a clear one-line message (exit code 1). `agreed`: every rank raises it at
    the same point (reported once, by rank 0)."""

    def __init__(self, msg: str, agreed: bool = True):
        super().__init__(msg)
        self.agreed = agreed


@dataclass
class TrainState:
    """Restartable loop counters (torchtitan style)."""
    epoch: int = 0
    stage: int = 0
    step: int = 0  # optimizer steps taken (DeepSpeed's global_steps, incl. skipped ones)
    step_in_epoch: int = 0  # optimizer steps taken in `epoch`
    batch_in_epoch: int = 0  # micro-batches consumed in `epoch` on each rank
    samples: int = 0  # training samples seen, all ranks
    nonfinite: int = 0  # micro-batches with a NaN/inf loss, all ranks
    nonfinite_steps: int = 0  # optimizer steps skipped because their accumulation window had one
    skips: dict = field(default_factory=dict)  # samples skipped by the loaders, per reason, all ranks
    epoch_done: bool = False  # the checkpoint was taken after the last batch of `epoch`

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v)


# ---------------------------------------------------------------- RNG and version
def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(sd: dict) -> None:
    random.setstate(sd["python"])
    np.random.set_state(sd["numpy"])
    torch.set_rng_state(sd["torch"])


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(mmcoconut.__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return mmcoconut.__version__ + (f"+g{sha}" if sha else "")


def _gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- save
def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def _no_space(exn: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the chain, or torch's zip writer's way of saying it (issue 13)."""
    while exn is not None:
        if isinstance(exn, OSError) and exn.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exn)
        if "No space left" in text or "unexpected pos" in text or "file write failed" in text:
            return True
        exn = exn.__cause__ or exn.__context__
    return False


def _save_failed(run_dir: Path, tag: str, exn: BaseException, rank: int) -> TrainError:
    shutil.rmtree(run_dir / tag, ignore_errors=True)  # partial: free its space; the previous checkpoint is untouched
    try:
        free = _human(shutil.disk_usage(run_dir).free)
    except OSError:
        free = "unknown"
    prev = [t for t in list_tags(run_dir, warn=False) if t != tag]
    if rank == 0:
        fix_latest(run_dir, prev)
    what = "no space left on device" if _no_space(exn) else f"{type(exn).__name__}: {str(exn).splitlines()[0][:200]}"
    return TrainError(f"checkpoint {tag} could not be written to {run_dir} (rank {rank}): {what}; {free} free there. "
                      + (f"The previous checkpoint {prev[-1]} is intact: free space (or lower checkpoint.keep_last) "
                         "and run the same command again to resume from it." if prev else
                         "No earlier checkpoint exists."), agreed=False)


def save(engine, cfg, state: TrainState, loader, tag: str) -> None:
    """Every rank calls this. Saves, then rank 0 records the tag and prunes to checkpoint.keep_last."""
    run_dir = Path(cfg.run_dir)
    per_rank = _gather({"loader": loader.state_dict(), "rng": rng_state()})
    client = {"train": state.state_dict(), "ranks": per_rank, "config": cfg.to_dict(), "version": code_version(),
              "world_size": len(per_rank)}
    try:
        engine.save_checkpoint(str(run_dir), tag, client_state=client, exclude_frozen_parameters=True)
    except Exception as e:  # noqa: BLE001  (disk full shows up as OSError or as torch's RuntimeError)
        raise _save_failed(run_dir, tag, e, engine.global_rank) from e
    _barrier()  # every rank's files are written
    if engine.global_rank == 0:
        meta = {"tag": tag, "world_size": len(per_rank), "zero_stage": engine.zero_optimization_stage(),
                "step": state.step, "epoch": state.epoch, "epoch_done": state.epoch_done,
                "micro_batch_size": engine.train_micro_batch_size_per_gpu(), "version": client["version"],
                "saved_at": round(time.time(), 3), "skips": dict(state.skips), "config": client["config"]}
        try:
            write_meta(run_dir / tag, meta)
        except OSError as e:
            raise _save_failed(run_dir, tag, e, 0) from e
        tags = [t for t in list_tags(run_dir, warn=False) if t != tag] + [tag]
        prune(run_dir, tags, max(1, cfg.checkpoint.keep_last))
    _barrier()


# ---------------------------------------------------------------- resume
@dataclass
class ResumePlan:
    tag: str
    universal: bool  # load `<run_dir>/<tag>_universal` (converted) with load_universal
    meta: dict
    notes: list = field(default_factory=list)  # harmless / allowed config changes, printed on rank 0


def _check_drift(cfg, run_dir: Path, tag: str, meta: dict, micro: Optional[int], world: int) -> list[str]:
    """ConfigError for changes of the model / data / curriculum (drift.py); notes for the rest."""
    old = meta.get("config")
    if old is None and (run_dir / "config.yaml").is_file():  # checkpoints from before META carried the config
        import yaml
        old = yaml.safe_load((run_dir / "config.yaml").read_text())
    if not isinstance(old, dict):
        return [f"{run_dir / tag} records no config: config drift not checked"]
    old = {s: dict(v) for s, v in old.items() if isinstance(v, dict)}
    old["model"] = resolved_section(old.get("model", {}))  # relative model paths of older runs, as now recorded
    new = cfg.to_dict()
    old.setdefault("train", {})
    if meta.get("world_size") != world or micro is None:  # elastic: accumulation (and micro) are re-derived
        old["train"]["micro_batch_size"] = new["train"]["micro_batch_size"]
    elif meta.get("micro_batch_size") is not None:  # compare the micro-batch size in effect (ds_config or override)
        old["train"]["micro_batch_size"], new["train"]["micro_batch_size"] = meta["micro_batch_size"], micro
    return drift.check(old, new, cfg.checkpoint.allow_config_change, f"{run_dir / tag}")


def plan_resume(cfg, world: int, zero_stage: int, micro: Optional[int] = None) -> Optional[ResumePlan]:
    """Which checkpoint to load, decided before deepspeed.initialize (load_universal is a ds_config switch).

    checkpoint.resume: auto (newest complete, fresh start if none) | none | 0 (fresh) | N (end of epoch N) |
    <tag> | universal[:<tag>] (the converted copy written by `python -m mmcoconut.cli.universal`).
    A checkpoint from another world size is loaded through its universal copy (automatically when it exists).
    """
    run_dir, r = Path(cfg.run_dir), cfg.checkpoint.resume
    tags = list_tags(run_dir)
    want_universal = isinstance(r, str) and r.startswith("universal")
    if r in ("none", 0, "0"):
        return None
    if r == "auto" or r == "universal":
        if not tags:
            if r == "universal":
                raise ConfigError(f"checkpoint.resume=universal: no complete checkpoint in {run_dir}")
            return None
        tag = tags[-1]
    elif want_universal:
        tag = r.split(":", 1)[1]
    elif isinstance(r, int) or (isinstance(r, str) and r.isdigit()):
        tag = f"epoch{int(r):03d}"
    else:
        tag = r
    if tag not in tags:
        raise ConfigError(f"checkpoint.resume={r!r}: no complete checkpoint {tag!r} in {run_dir} "
                          f"(have: {tags or 'none'})")
    meta = read_meta(run_dir, tag)
    stages = {meta["zero_stage"], zero_stage}
    if 3 in stages and len(stages) > 1:
        raise ConfigError(f"checkpoint {run_dir / tag} was saved with ZeRO-{meta['zero_stage']}; it cannot be "
                          f"resumed with ZeRO-{zero_stage} (DeepSpeed's universal checkpoints do not convert "
                          "between ZeRO-3 and ZeRO-1/2). Use a ds_config of the same stage.")
    elastic = meta["world_size"] != world
    if elastic or want_universal:
        conv = run_dir / (tag + UNIVERSAL_SUFFIX)
        if not (conv / "zero").is_dir():
            raise ConfigError(
                f"checkpoint {run_dir / tag} was saved by {meta['world_size']} process(es), this run has {world}: "
                f"convert it once with `python -m mmcoconut.cli.universal {run_dir} --tag {tag}`, then run "
                "again (it is picked up automatically)")
        return ResumePlan(tag, True, meta, _check_drift(cfg, run_dir, tag, meta, None, world))
    return ResumePlan(tag, False, meta, _check_drift(cfg, run_dir, tag, meta, micro, world))


def load(engine, cfg, plan: ResumePlan, state: TrainState, loader, world: int, rank: int) -> dict:
    """Restore weights/optimizer/scheduler (DeepSpeed), counters and loader position; returns the RNG states for
    the caller to set at the point of the loop where they were taken."""
    run_dir = Path(cfg.run_dir)
    tag = plan.tag + UNIVERSAL_SUFFIX if plan.universal else plan.tag
    frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}

    def load_trainable(src, dst):  # frozen weights were excluded on save: they come from the pretrained model
        res = dst.load_state_dict(src, strict=False)
        missing = set(res.missing_keys) - frozen
        if missing or res.unexpected_keys:
            raise RuntimeError(f"checkpoint {run_dir / tag} does not match the model: missing {sorted(missing)[:5]}, "
                               f"unexpected {sorted(res.unexpected_keys)[:5]}")

    path, client = engine.load_checkpoint(str(run_dir), tag, custom_load_fn=load_trainable)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {run_dir / tag}")
    state.load_state_dict(client["train"])
    ranks = client["ranks"]
    if len(ranks) == world:  # same layout: this rank's own stream position and RNG, exact continuation
        loader.load_state_dict(ranks[rank]["loader"])
        return ranks[rank]["rng"]
    else:  # elastic: same global position (samples), new per-rank split; the sample order differs
        old = ranks[0]["loader"]
        consumed = old["batches_consumed"] * len(ranks) * plan.meta["micro_batch_size"]
        consumed //= world * engine.train_micro_batch_size_per_gpu()
        skips = dict(state.skips) if rank == 0 else {}  # run totals live on rank 0 from here on
        loader.load_state_dict(dict(old, batches_consumed=consumed, rank=rank, world_size=world, positions=None,
                                    skips=skips))
        state.batch_in_epoch = consumed
        return ranks[rank % len(ranks)]["rng"]
