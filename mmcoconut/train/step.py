"""One optimizer step's bookkeeping: one collective and at most one host read per step, and one decision.

During a step the loss statistics accumulate on the device and the sample/token counts in a host tensor (from
the CPU batch): nothing is read back. Before the last micro-batch's backward, one all-reduce carries
[loss sum, finite count, non-finite count | samples, tokens, stop requests, save-due flag, skip counts per
reason]. Its non-finite count stays on the device and turns into the backward's poison factor (1 or NaN, see the
engines' `finish_window`), so the skip decision is identical on every rank without a host sync.

The host reads a step's values (logging, counters, stop / save decisions) one step later (`lag=1`): the read
waits on an event recorded a whole step earlier, so the device queue never drains. Reads are in step order,
each step's vector exactly once; `ready(flush=True)` reads everything (epoch ends, checkpoints). Every rank
reads the same steps at the same boundaries, so decisions taken from them agree. With `lag=0` (an engine that
decides the skip on the host: DeepSpeed ZeRO-0 fp32, FSDP2) the vector is read right after the all-reduce.

StepSync: the device side. StepBook: the host side (counters, metrics records, run-stopping checks). Steps: both,
plus the save clock; `Steps.close(...)` returns the step's one Decision (save now, stop now, finish now).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mmcoconut.data.pipeline import SKIP_REASONS

from .errors import TrainError

MIN_SEEN_FOR_SKIP_CHECK = 1000  # mid-epoch; at each epoch end the skip fraction is checked whatever the count

DEV_FIELDS = ("loss_sum", "n_finite", "n_bad")
HOST_FIELDS = ("samples", "tokens", "stop", "save_due") + tuple(f"skip_{r}" for r in SKIP_REASONS)
FIELDS = DEV_FIELDS + HOST_FIELDS + ("grad_norm",)  # grad_norm: this rank's (identical on all), not reduced


@dataclass
class StepRecord:
    values: dict  # FIELDS -> float (reduced over ranks, except grad_norm)
    info: dict = field(default_factory=dict)  # host snapshot taken at the step: step, epoch, lr, time, ...


class StepSync:
    def __init__(self, device, world: int, lag: int = 1):
        self.device, self.world, self.lag = torch.device(device), world, lag
        self.cuda = self.device.type == "cuda"
        self.pending: deque = deque()
        self.reads = 0  # host reads of step vectors (tests: at most one per step)
        self.begin()

    def begin(self) -> None:
        self.dev = torch.zeros(len(DEV_FIELDS), dtype=torch.float64, device=self.device)
        self.host = torch.zeros(len(HOST_FIELDS), dtype=torch.float64)

    def add(self, loss: torch.Tensor, rows: int, attention_mask_cpu: torch.Tensor) -> None:
        """One micro-batch: its loss (device, not read) and its size (CPU batch)."""
        value = loss.detach().to(torch.float64)
        finite = torch.isfinite(value)
        self.dev += torch.stack([torch.where(finite, value, torch.zeros_like(value)), finite.double(),
                                 (~finite).double()])
        self.host[0] += rows
        self.host[1] += attention_mask_cpu.sum()

    def reduce(self, stop: bool, save_due: bool, skips: dict) -> torch.Tensor:
        """The step's collective (call on every rank at the last micro-batch, before its backward)."""
        h = self.host
        h[2], h[3] = float(stop), float(save_due)
        for i, r in enumerate(SKIP_REASONS):
            h[4 + i] = skips.get(r, 0)
        if self.cuda:
            h = h.pin_memory()
        vec = torch.cat([self.dev, h.to(self.device, non_blocking=True)])
        if self.world > 1:
            dist.all_reduce(vec)
        return vec

    @staticmethod
    def poison(vec: torch.Tensor) -> torch.Tensor:
        """1.0, or NaN when any rank's window had a non-finite loss (a device scalar: no host sync)."""
        bad = vec[DEV_FIELDS.index("n_bad")] > 0
        return torch.where(bad, torch.full_like(vec[0], math.nan), torch.ones_like(vec[0])).float()

    def read_now(self, vec: torch.Tensor) -> dict:
        """lag=0: the values at once (a host sync before the backward)."""
        self.reads += 1
        return dict(zip(FIELDS, vec.tolist() + [math.nan]))

    def push(self, vec: torch.Tensor, grad_norm, info: dict, values: dict = None) -> None:
        """After engine.step(): queue the step's record; its device values are copied to the host asynchronously."""
        info = dict(info, time=time.perf_counter())
        if values is not None:  # already read (lag=0)
            values["grad_norm"] = _host_float(grad_norm)
            self.pending.append((StepRecord(values, info), None, None))
            return
        if torch.is_tensor(grad_norm):
            tail = grad_norm.detach().reshape(1).to(device=vec.device, dtype=vec.dtype)
            info["grad_norm_host"] = None
        else:
            tail = torch.full((1,), math.nan, dtype=vec.dtype, device=vec.device)
            info["grad_norm_host"] = _host_float(grad_norm)
        full = torch.cat([vec, tail])
        buf = torch.empty(full.shape, dtype=full.dtype, pin_memory=self.cuda)
        buf.copy_(full, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((StepRecord({}, info), buf, event))

    def ready(self, flush: bool = False) -> list[StepRecord]:
        """Records that may be read now: all but the newest `lag` ones, or all with flush."""
        out = []
        while self.pending and (flush or len(self.pending) > self.lag):
            rec, buf, event = self.pending.popleft()
            if buf is not None:
                if event is not None:
                    event.synchronize()
                rec.values = dict(zip(FIELDS, buf.tolist()))
                self.reads += 1
                gn = rec.info.pop("grad_norm_host", None)
                if gn is not None:  # DeepSpeed gave a Python number, not a device tensor
                    rec.values["grad_norm"] = gn
            out.append(rec)
        return out


def _host_float(v):
    if v is None:
        return None
    if torch.is_tensor(v):
        return float(v.item())
    return float(v)


# ---------------------------------------------------------------- host side
class StepBook:
    """Counters, metrics records and run-stopping checks from the reduced step values; every rank reads the same
    values at the same boundary, so what it concludes (a stop was requested somewhere, a save is due) agrees."""

    def __init__(self, cfg, state, tracker):
        self.cfg, self.state, self.tracker = cfg, state, tracker
        self.stop_seen = False  # some rank received a stop signal
        self.save_due = False  # checkpoint.save_every_minutes elapsed on rank 0 (cleared by a save)
        self.in_a_row = 0  # optimizer steps in a row with a non-finite loss
        self.last_loss = self.last_lr = None
        self.t0 = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.win = {"loss": 0.0, "n": 0.0, "samples": 0.0, "tokens": 0.0}

    def take(self, records) -> None:
        for rec in records:
            self._one(rec.values, rec.info)

    def _one(self, v: dict, info: dict) -> None:
        s, t = self.state, self.cfg.train
        bad = int(v["n_bad"])
        s.samples += int(v["samples"])
        s.nonfinite += bad
        s.skips = {r: int(v[f"skip_{r}"]) for r in SKIP_REASONS if v[f"skip_{r}"]}
        for k, f in (("loss", "loss_sum"), ("n", "n_finite"), ("samples", "samples"), ("tokens", "tokens")):
            self.win[k] += v[f]
        self.stop_seen = self.stop_seen or v["stop"] > 0
        self.save_due = self.save_due or v["save_due"] > 0
        if bad:
            s.nonfinite_steps += 1
            self.in_a_row += 1
            self.tracker.log("nonfinite", step=info["step"], epoch=info["epoch"], stage=info["stage"], batches=bad,
                             in_a_row=self.in_a_row, total=s.nonfinite_steps)
            if self.in_a_row >= t.max_nonfinite_steps:
                raise TrainError(f"{self.in_a_row} optimizer steps in a row had a NaN/inf loss (train."
                                 f"max_nonfinite_steps={t.max_nonfinite_steps}) at step {info['step']}, epoch "
                                 f"{info['epoch']}: stopping (those updates were skipped, no checkpoint holds a "
                                 "NaN). Lower train.lr, check the data, or use fp32/bf16.")
        else:
            self.in_a_row = 0
        if info["step"] % t.log_every == 0 or info["last"]:
            self._log(v, info)
        self._check_skips(info)

    def _log(self, v: dict, info: dict) -> None:
        s, w = self.state, self.win
        dt = max(info["time"] - self.t0, 1e-9)
        loss = w["loss"] / w["n"] if w["n"] else None
        self.last_loss, self.last_lr = loss, info["lr"]
        self.tracker.log("train", step=info["step"], epoch=info["epoch"], stage=info["stage"], loss=loss,
                         lr=info["lr"], grad_norm=v.get("grad_norm"), loss_scale=info["loss_scale"],
                         skipped_steps=info["skipped_steps"], samples_per_s=w["samples"] / dt,
                         tokens_per_s=w["tokens"] / dt, nonfinite_steps=s.nonfinite_steps,
                         skipped_samples=sum(s.skips.values()),
                         **{f"skipped_{r}": s.skips.get(r, 0) for r in SKIP_REASONS})
        self.t0 = info["time"]
        self._reset()

    def _check_skips(self, info: dict) -> None:
        limit, s = self.cfg.data.max_skip_fraction, self.state
        skipped = sum(s.skips.values())
        seen = s.samples + skipped
        if limit is None or not skipped or (seen < MIN_SEEN_FOR_SKIP_CHECK and not info["last"]):
            return
        if skipped > limit * seen:
            parts = ", ".join(f"{r} {n}" for r, n in s.skips.items())
            raise TrainError(f"data: {skipped} of {seen} training samples ({100 * skipped / seen:.1f} %) were "
                             f"skipped ({parts}) by step {info['step']}, more than data.max_skip_fraction={limit}; "
                             "the warnings above name the shards and sample keys. Fix the shards (or the filter "
                             "that drops them), or raise data.max_skip_fraction (null: no limit).")


# ---------------------------------------------------------------- both, and the decision
@dataclass(frozen=True)
class Decision:
    """What the trainer does after an optimizer step."""
    save: bool  # checkpoint now (save_every_steps, a due time-based save, or a stop request); not at epoch ends
    stop: bool  # a stop signal reached some rank: raise Stopped once saved (at an epoch end: after that save)
    finish: bool  # the test-only stop_after_steps was reached: end training here, like a kill


class Steps:
    """The step machinery of one run: StepSync + StepBook + the time-based save clock (rank 0's)."""

    def __init__(self, cfg, state, tracker, engine, stop_after_steps: int = 0):
        self.cfg, self.state = cfg, state
        self.sync = StepSync(engine.device, engine.world, lag=0 if engine.host_decides_skip else 1)
        self.book = StepBook(cfg, state, tracker)
        self.stop_after = stop_after_steps
        self.saves_by_time = engine.rank == 0 and cfg.checkpoint.save_every_minutes > 0
        self.last_save = time.monotonic()

    def begin(self) -> None:
        self.sync.begin()

    def add(self, loss: torch.Tensor, rows: int, attention_mask_cpu: torch.Tensor) -> None:
        self.sync.add(loss, rows, attention_mask_cpu)

    def reduce(self, stop_requested: bool, skips: dict) -> torch.Tensor:
        """The step's one collective (last micro-batch, before its backward): also carries rank 0's save clock."""
        due = self.saves_by_time and time.monotonic() - self.last_save >= 60 * self.cfg.checkpoint.save_every_minutes
        if due:
            self.last_save = time.monotonic()  # flagged once; the save follows at the next boundaries
        return self.sync.reduce(stop_requested, due, skips)

    def close(self, vec: torch.Tensor, grad_norm, values, info: dict) -> Decision:
        """After the optimizer step: queue its record, read what may be read, and decide."""
        self.sync.push(vec, grad_norm, values=values, info=info)
        s, every = self.state, self.cfg.checkpoint.save_every_steps
        last, by_steps = info["last"], bool(every) and s.step % every == 0
        self.book.take(self.sync.ready(flush=last or by_steps or s.step == self.stop_after))
        if self.book.stop_seen or self.book.save_due:
            self.flush()
        save = not last and (by_steps or self.book.save_due or self.book.stop_seen)
        return Decision(save=save, stop=self.book.stop_seen and not last,
                        finish=bool(self.stop_after) and s.step >= self.stop_after)

    def flush(self) -> None:
        """Read every queued step (before a checkpoint: its counters include every step so far)."""
        self.book.take(self.sync.ready(flush=True))

    def saved(self) -> None:
        """A checkpoint was written: the time-based save is no longer due and its clock restarts."""
        self.book.save_due = False
        self.last_save = time.monotonic()
