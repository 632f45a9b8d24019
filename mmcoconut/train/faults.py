"""Fault injection for tests: a small object the tests hand to the Trainer (nothing is read inside the loop).

A subprocess run gets it once at start-up from the test-only variable MMCOCONUT_TEST_FAULTS (mmcoconut/cli/train.py),
`;`-separated `key=value` items:
  stop_after_steps=N      stop (like a kill) once N optimizer steps are done, after any save at N
  overflow_steps=3,4      backward(loss * inf) during those optimizer steps: an fp16 overflow that the engine's loss
                          scaler must skip (the logged loss stays finite)
  nan_batches=5,21        the loss of those micro-batches becomes NaN (1-based, counted per rank from the start of
                          the run, so a resumed run meets the same ones)
  nan_ranks=0             ... on these ranks only (default: all)
  pause_at_step=N         after step N each rank touches <pause_file>.reached.<rank> and waits while <pause_file>
  pause_file=PATH         exists (tests act on a run at a known step)
e.g. MMCOCONUT_TEST_FAULTS="nan_batches=5,21;nan_ranks=0".
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from mmcoconut.config import ConfigError

ENV = "MMCOCONUT_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    stop_after_steps: int = 0
    overflow_steps: frozenset = field(default_factory=frozenset)
    nan_batches: frozenset = field(default_factory=frozenset)
    nan_ranks: frozenset = field(default_factory=frozenset)
    pause_at_step: int = 0
    pause_file: str = ""

    @classmethod
    def parse(cls, text: str) -> "Faults":
        """From `key=value;key=a,b` (the module doc). Raises ConfigError naming the bad item."""
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for item in filter(None, (x.strip() for x in text.split(";"))):
            key, _, raw = item.partition("=")
            if key not in kinds:
                raise ConfigError(f"{ENV}: unknown item {key!r}; known: {sorted(kinds)}")
            try:
                if kinds[key] == "frozenset":
                    values[key] = frozenset(int(x) for x in raw.split(",") if x.strip())
                else:
                    values[key] = raw if kinds[key] == "str" else int(raw)
            except ValueError:
                raise ConfigError(f"{ENV}: {item!r} is not {key}=<integer(s)>") from None
        return cls(**values)

    @classmethod
    def from_env(cls) -> "Faults":
        return cls.parse(os.environ.get(ENV, ""))

    def poison(self, loss, rank: int, micro_batch: int):
        """The loss, or NaN for an injected bad micro-batch (`micro_batch`: 1-based count since the run start)."""
        if micro_batch in self.nan_batches and (not self.nan_ranks or rank in self.nan_ranks):
            return loss * float("nan")
        return loss

    def overflow(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) gets an injected overflow."""
        return step in self.overflow_steps

    def pause(self, step: int, rank: int) -> None:
        if not (self.pause_at_step and self.pause_file and step == self.pause_at_step):
            return
        Path(f"{self.pause_file}.reached.{rank}").touch()
        while Path(self.pause_file).exists():
            time.sleep(0.1)
