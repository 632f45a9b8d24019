"""Checkpoints: DeepSpeed's save/load plus the glue to resume a run exactly.

Layout of a run dir: `<run_dir>/<tag>/` (DeepSpeed's files, tag = step00000040 | epoch002), DeepSpeed's `latest`,
and two side files written by rank 0 after a barrier, so they only name complete checkpoints:
`<run_dir>/<tag>/mmcoconut.json` (world size, ZeRO stage, step, epoch) and `<run_dir>/checkpoints.json` (tags in
save order, used for keep_last and `resume: auto`).
client_state: train counters, the resolved config, code version, and every rank's loader state + RNG states
(all-gathered: DeepSpeed writes client_state only from rank 0's model-states file).
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

import mmcoconut
from mmcoconut.config import ConfigError

INDEX, META, UNIVERSAL_SUFFIX = "checkpoints.json", "mmcoconut.json", "_universal"


@dataclass
class TrainState:
    """Restartable loop counters (torchtitan style)."""
    epoch: int = 0
    stage: int = 0
    step: int = 0  # optimizer steps taken (DeepSpeed's global_steps, incl. fp16-skipped ones)
    step_in_epoch: int = 0  # optimizer steps taken in `epoch`
    batch_in_epoch: int = 0  # micro-batches consumed in `epoch` on each rank
    samples: int = 0  # training samples seen, all ranks
    nonfinite: int = 0  # NaN/inf losses skipped in total
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


# ---------------------------------------------------------------- index of complete checkpoints
def list_tags(run_dir) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    p = Path(run_dir) / INDEX
    tags = json.loads(p.read_text()) if p.is_file() else []
    return [t for t in tags if (Path(run_dir) / t / META).is_file()]


def read_meta(run_dir, tag: str) -> dict:
    return json.loads((Path(run_dir) / tag / META).read_text())


# ---------------------------------------------------------------- save
def save(engine, cfg, state: TrainState, loader, tag: str) -> None:
    """Every rank calls this. Saves, then rank 0 records the tag and prunes to checkpoint.keep_last."""
    run_dir = Path(cfg.run_dir)
    per_rank = _gather({"loader": loader.state_dict(), "rng": rng_state()})
    client = {"train": state.state_dict(), "ranks": per_rank, "config": cfg.to_dict(), "version": code_version(),
              "world_size": len(per_rank)}
    engine.save_checkpoint(str(run_dir), tag, client_state=client, exclude_frozen_parameters=True)
    _barrier()  # every rank's files are written
    if engine.global_rank == 0:
        meta = {"tag": tag, "world_size": len(per_rank), "zero_stage": engine.zero_optimization_stage(),
                "step": state.step, "epoch": state.epoch, "epoch_done": state.epoch_done,
                "micro_batch_size": engine.train_micro_batch_size_per_gpu(), "version": client["version"]}
        (run_dir / tag / META).write_text(json.dumps(meta, indent=1))
        tags = [t for t in list_tags(run_dir) if t != tag] + [tag]
        keep = max(1, cfg.checkpoint.keep_last)
        for old in tags[:-keep]:
            shutil.rmtree(run_dir / old, ignore_errors=True)
            shutil.rmtree(run_dir / (old + UNIVERSAL_SUFFIX), ignore_errors=True)
        (run_dir / INDEX).write_text(json.dumps(tags[-keep:]))
    _barrier()


# ---------------------------------------------------------------- resume
@dataclass
class ResumePlan:
    tag: str
    universal: bool  # load `<run_dir>/<tag>_universal` (converted) with load_universal
    meta: dict


def plan_resume(cfg, world: int, zero_stage: int) -> Optional[ResumePlan]:
    """Which checkpoint to load, decided before deepspeed.initialize (load_universal is a ds_config switch).

    checkpoint.resume: auto (newest complete, fresh start if none) | none | 0 (fresh) | N (end of epoch N) |
    <tag> | universal[:<tag>] (the converted copy written by `python -m mmcoconut.train.universal`).
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
                f"convert it once with `python -m mmcoconut.train.universal {run_dir} --tag {tag}`, then run "
                "again (it is picked up automatically)")
        return ResumePlan(tag, True, meta)
    return ResumePlan(tag, False, meta)


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
        loader.load_state_dict(dict(old, batches_consumed=consumed, rank=rank, world_size=world, positions=None))
        state.batch_in_epoch = consumed
        return ranks[rank % len(ranks)]["rng"]
