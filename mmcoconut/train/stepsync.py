"""One collective and at most one host read per optimizer step.

During a step the loss statistics accumulate on the device and the sample/token counts in a host tensor (from
the CPU batch): nothing is read back. Before the last micro-batch's backward, one all-reduce carries
[loss sum, finite count, non-finite count | samples, tokens, stop requests, save-due flag, skip counts per
reason]. Its non-finite count stays on the device and turns into the backward's poison factor (1 or NaN,
nonfinite.py), so the skip decision is identical on every rank without a host sync.

The host reads a step's values (logging, counters, stop / save decisions) one step later (`lag=1`): the read
waits on an event recorded a whole step earlier, so the device queue never drains. Reads are in step order,
each step's vector exactly once; `ready(flush=True)` reads everything (epoch ends, checkpoints). Every rank
reads the same steps at the same boundaries, so decisions taken from them agree. With `lag=0` (ZeRO-0 fp32,
nonfinite.HOST) the vector is read right after the all-reduce, before the backward.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mmcoconut.data.pipeline import SKIP_REASONS

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
