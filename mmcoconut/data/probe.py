"""A look at the first samples of the training shards before anything is built (the trainer's pre-flight).

Two things are read from the samples themselves: whether they can be trained on at all (a stream whose samples all
fail is one early error naming the shard and the reason, not a traceback minutes later), and the prompt format
(whether the questions list their choices, " The choices are 0: ...", which the run records as
data.choices_in_question and the export ships: modeling/prompt.py).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Optional

from ..modeling.prompt import lists_choices
from .pipeline import SkipCounter
from .shardlist import ShardReader

PER_SHARD = 8  # samples read from each probed shard
MAX_SHARDS = 4  # shards probed, in spec order


@dataclass
class Probe:
    shards: list = field(default_factory=list)  # the shards read
    read: int = 0  # samples read
    bad: list = field(default_factory=list)  # (shard, key, reason) of the samples that cannot be trained on
    listed: int = 0  # good samples with choices whose question lists them
    unlisted: int = 0  # ... whose question does not

    @property
    def all_bad(self) -> bool:
        return self.read > 0 and len(self.bad) == self.read

    @property
    def choices_in_question(self) -> Optional[bool]:
        """True / False when the good samples agree (False too when none has choices), None when nothing was
        read or they disagree."""
        if self.listed and self.unlisted or self.read == len(self.bad):
            return None
        return self.listed > 0


def sample_problem(raw: dict, need_steps: bool) -> tuple[Optional[str], Optional[bool]]:
    """(why the sample cannot be trained on, or None; whether its question lists its choices)."""
    from PIL import Image

    if "json" not in raw:
        return "bad_json: no .json member", None
    try:
        sample = json.loads(raw["json"])
    except ValueError as e:
        return f"bad_json: {type(e).__name__}: {e}", None
    if not isinstance(sample, dict) or not isinstance(sample.get("question"), str):
        return "bad_json: json is not an object with a 'question' string", None
    steps = sample.get("steps")
    if need_steps and not (isinstance(steps, list) and steps and all(isinstance(s, str) for s in steps)):
        return "no_steps: 'steps' is missing, empty or not a list of strings", None
    data = raw.get("jpg", raw.get("jpeg", raw.get("png")))
    if data is None:
        return "bad_image: no .jpg member", None
    try:
        Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001  (PIL raises many types)
        return f"bad_image: {type(e).__name__}: {e}", None
    choices = sample.get("choices")
    ok = isinstance(choices, list) and all(isinstance(c, str) for c in choices)
    return None, lists_choices(sample["question"], choices) if ok else None


class _QuietSkips(SkipCounter):
    """The probe's: a shard that breaks while probed is passed over without a 'skipping' warning (nothing of the
    training data is skipped: the training stream reads it again, with its retries)."""

    def skip(self, reason: str, msg: str, n: int = 1) -> None:
        pass


def probe_shards(urls: list[str], data_cfg, need_steps: bool) -> Probe:
    """Read PER_SHARD samples from each of the first MAX_SHARDS shards (unreadable shards are passed over)."""
    out = Probe()
    reader = ShardReader(_QuietSkips(), retries=0, timeout=data_cfg.shard_timeout)
    for url in urls[:MAX_SHARDS]:
        out.shards.append(url)
        for raw in reader.shard(url, limit=PER_SHARD):
            out.read += 1
            why, listed = sample_problem(raw, need_steps)
            if why is not None:
                out.bad.append((url, raw.get("__key__", "?"), why))
            elif listed is not None:
                out.listed += int(listed)
                out.unlisted += int(not listed)
    return out
