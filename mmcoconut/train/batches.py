"""What a training step reads: the rank's batch stream (a restartable object) and the move of a batch to the device.

TrainStream is one `state_dict` / `load_state_dict` object holding the loader's position and the RNG states taken
at that position. The loader draws a seed from torch's RNG when an epoch's iterator opens (its first `next()`): a
stream resumed in the middle of an epoch re-opens that iterator without the draw (the interrupted run drew it at
the start of the epoch, before the saved RNG state), so the RNG restored by `load_state_dict` is exactly the one
the next forward would have used. A stream resumed at an epoch end opens the next epoch as the interrupted run did.
"""
from __future__ import annotations

from typing import Iterator

import torch

from .checkpoint.states import rng_neutral, rng_state, set_rng_state


class TrainStream:
    def __init__(self, loader):
        self.loader = loader

    def state_dict(self) -> dict:
        """This rank's loader position and RNG states (the checkpoint keeps one per rank)."""
        return {"loader": self.loader.state_dict(), "rng": rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.loader.load_state_dict(sd["loader"])
        set_rng_state(sd["rng"])

    def epoch(self, epoch: int, stage: int) -> Iterator[dict]:
        """The batches of `epoch` still to come, for curriculum `stage`."""
        self.loader.set_epoch(epoch)
        self.loader.set_stage(stage)
        batches = iter(self.loader)
        if self.loader.consumed > 0:  # resumed mid-epoch: re-open without the RNG draw of an epoch start
            with rng_neutral():
                first = next(batches)
            yield first
        yield from batches


def to_device(batch: dict, device, dtype) -> dict:
    """Tensors (pinned by the loader on CUDA) and objects with a `.to` (e.g. a precomputed pass plan) move with
    non_blocking copies; floating tensors then take the model dtype on the device; everything else passes."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and v.dtype != dtype:
                v = v.to(dtype)
        elif callable(getattr(v, "to", None)) and not isinstance(v, (str, bytes)):
            v = v.to(device, non_blocking=True)
        out[k] = v
    return out
