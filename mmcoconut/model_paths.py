"""Local model paths of a run config made absolute, so that a run dir and what is built from it work from anywhere.

model.lm_id / vision_id / tokenizer_id are a Hub id ('gpt2', 'openai/clip-vit-base-patch32') or a local dir;
model.init_from is a local file or dir. A relative path means the directory it was given in: the trainer resolves
it against its working directory and records it absolute (checkpoints, config.yaml, exports). Runs recorded before
that are loaded by trying the caller's directory, then the run dir and its parents. A value that is a path (it
starts with '/', '.' or '~', or has more than one '/') but does not exist is one ConfigError naming the key and
the path; so is a missing model.init_from.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from .config import ConfigError

MODEL_PATH_KEYS = ("lm_id", "vision_id", "tokenizer_id", "init_from")
SEED_NAMES = {"init_from": "load_model_path", "lm_id": "model_id", "vision_id": "clip_id"}


def looks_like_path(value: str) -> bool:
    """A Hub id is 'name' or 'namespace/name'; anything else with a '/' (or starting with '/', '.', '~') is a path."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1


def find_path(value: str, bases: Iterable[Path]) -> Optional[str]:
    """`value` as an existing absolute path: itself when absolute, else the first base it exists under."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p) if p.exists() else None
    for base in bases:
        if (Path(base) / p).exists():
            return os.path.abspath(Path(base) / p)
    return None


def resolve_model_paths(mcfg, bases: Iterable[Path], keys=MODEL_PATH_KEYS) -> None:
    """Make the local paths of `mcfg` (a ModelConfig) absolute, trying `bases` in order for relative ones.
    ConfigError (one line) for a path that does not exist, and for a missing init_from."""
    bases = [Path(b) for b in bases]
    for key in keys:
        value = getattr(mcfg, key)
        if not value:
            continue
        found = find_path(value, bases)
        if found is not None:
            setattr(mcfg, key, found)
        elif key == "init_from" or looks_like_path(value):
            alias = f" (seed key {SEED_NAMES[key]})" if key in SEED_NAMES else ""
            where = "" if Path(value).expanduser().is_absolute() else \
                " (relative to " + " or ".join(str(b) for b in bases) + ")"
            raise ConfigError(f"model.{key}{alias}: {value}: no such file or directory{where}")


def resolved_section(model: dict, base: Optional[Path] = None) -> dict:
    """A recorded `model` section with its relative paths made absolute against `base` (default: the working
    directory) where they exist; nothing raised (resume compares it with the new, resolved config)."""
    out = dict(model)
    for key in MODEL_PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value:
            out[key] = find_path(value, [base or Path.cwd()]) or value
    return out
