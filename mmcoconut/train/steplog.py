"""Host side of the per-step values (stepsync.py): counters, metrics records, run-stopping checks, and the
decisions every rank takes alike because it reads the same reduced values at the same step boundary."""
from __future__ import annotations

import time

from mmcoconut.data.pipeline import SKIP_REASONS

from .checkpoint import TrainError

MIN_SEEN_FOR_SKIP_CHECK = 1000  # mid-epoch; at each epoch end the skip fraction is checked whatever the count


class StepLog:
    def __init__(self, cfg, state, tracker, steps_per_epoch: int, world: int):
        self.cfg, self.state, self.tracker, self.world = cfg, state, tracker, world
        self.stop = False  # some rank received a stop signal
        self.save_due = False  # checkpoint.save_every_minutes elapsed on rank 0
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
        self.stop = self.stop or v["stop"] > 0
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
