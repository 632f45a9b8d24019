"""The restartable state of a run that is not the engine's (weights, optimizer, lr schedule, loss scale): loop
counters and RNG. Each is a `state_dict` / `load_state_dict` object (torchtitan's Stateful); the checkpoint manager
saves and restores them together (manager.py)."""
from __future__ import annotations

import random
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import mmcoconut


@dataclass
class TrainState:
    """Loop counters."""
    epoch: int = 0
    stage: int = 0  # curriculum stage of `epoch`
    step: int = 0  # optimizer steps taken (the engine's global steps, incl. skipped ones)
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


def rng_state() -> dict:
    """Python, NumPy and torch (CPU) generator states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(sd: dict) -> None:
    random.setstate(sd["python"])
    np.random.set_state(sd["numpy"])
    torch.set_rng_state(sd["torch"])


class rng_neutral:
    """`with rng_neutral(): ...`: the generators are as before afterwards (validation, re-opening a stream)."""

    def __enter__(self):
        self.saved = rng_state()

    def __exit__(self, *exc):
        set_rng_state(self.saved)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def code_version() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(mmcoconut.__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return mmcoconut.__version__ + (f"+g{sha}" if sha else "")
