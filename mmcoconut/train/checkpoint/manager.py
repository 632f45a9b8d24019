"""Checkpoints: one manager saves and restores every restartable thing of a run, in one place.

A checkpoint `<run_dir>/<tag>/` (tag = step00000040 | epoch002) holds the engine's state (weights, optimizer, lr
schedule, loss scale: DeepSpeed's files, or FSDP2's torch.distributed.checkpoint files) and a client state: the
train state (states.TrainState), every rank's batch stream (loader position + RNG, batches.TrainStream;
all-gathered), the resolved config and the code version. Rank 0 then writes, after a barrier, via temp file +
rename (index.py): `<tag>/mmcoconut.json` (engine, world size, ZeRO stage, step, epoch, resolved config, every
file's size: the completeness marker) and `<run_dir>/checkpoints.json` (complete tags in save order, for
keep_last and `resume: auto`). A save that fails (disk full, ...) raises TrainError naming the tag and the free
space; the partial tag dir is removed and the previous checkpoint stays as it was.
Loading restores the engine, the train state and this rank's stream (which sets the RNG) at once: the trainer
loads last in its set-up, so nothing draws random numbers between the restore and the first step.
"""
from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from ..errors import TrainError
from .index import fix_latest, list_tags, prune, write_meta
from .resume import ResumePoint
from .states import code_version


def _gather(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


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


def save_failed(run_dir: Path, tag: str, exn: BaseException, rank: int) -> TrainError:
    """The partial tag dir removed, DeepSpeed's `latest` repaired, and the one-line error to raise."""
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


class CheckpointManager:
    """save(tag) / load(resume) of the engine, the train state and the rank's batch stream (module doc)."""

    def __init__(self, cfg, engine, state, stream):
        self.cfg, self.engine, self.state, self.stream = cfg, engine, state, stream
        self.run_dir = Path(cfg.run_dir)

    def save(self, tag: str) -> None:
        """Every rank calls this. Saves, then rank 0 records the tag and prunes to checkpoint.keep_last."""
        run_dir, engine, state = self.run_dir, self.engine, self.state
        per_rank = _gather(self.stream.state_dict())
        client = {"train": state.state_dict(), "ranks": per_rank, "config": self.cfg.to_dict(),
                  "version": code_version(), "world_size": len(per_rank)}
        try:
            engine.save(run_dir, tag, client)
        except Exception as e:  # noqa: BLE001  (disk full shows up as OSError or as torch's RuntimeError)
            raise save_failed(run_dir, tag, e, engine.rank) from e
        _barrier()  # every rank's files are written
        if engine.rank == 0:
            meta = {"tag": tag, "world_size": len(per_rank), **engine.checkpoint_meta(), "step": state.step,
                    "epoch": state.epoch, "epoch_done": state.epoch_done, "version": client["version"],
                    "saved_at": round(time.time(), 3), "skips": dict(state.skips), "config": client["config"]}
            try:
                write_meta(run_dir / tag, meta)
            except OSError as e:
                raise save_failed(run_dir, tag, e, 0) from e
            tags = [t for t in list_tags(run_dir, warn=False) if t != tag] + [tag]
            prune(run_dir, tags, max(1, self.cfg.checkpoint.keep_last))
        _barrier()

    def load(self, resume: ResumePoint) -> None:
        """Restore the engine (weights, optimizer, schedule), the counters, and this rank's stream and RNG."""
        engine, state, world, rank = self.engine, self.state, self.engine.world, self.engine.rank
        client = engine.load(self.run_dir, resume.load_tag)
        state.load_state_dict(client["train"])
        ranks = client["ranks"]
        if len(ranks) == world:  # same layout: this rank's own stream position and RNG, exact continuation
            self.stream.load_state_dict(ranks[rank])
            return
        # another world size: same global position (samples), new per-rank split; the sample order differs
        old = ranks[0]["loader"]
        consumed = old["batches_consumed"] * len(ranks) * resume.meta["micro_batch_size"]
        consumed //= world * engine.spec.micro_batch_size
        skips = dict(state.skips) if rank == 0 else {}  # run totals live on rank 0 from here on
        loader = dict(old, batches_consumed=consumed, rank=rank, world_size=world, positions=None, skips=skips)
        self.stream.load_state_dict({"loader": loader, "rng": ranks[rank % len(ranks)]["rng"]})
        state.batch_in_epoch = consumed
