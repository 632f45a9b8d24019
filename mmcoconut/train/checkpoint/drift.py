"""Config drift on resume: the checkpoint's resolved config vs this run's.

Keys that change what the checkpoint means -- the model, the tokenizer, the data stream and its order, the
curriculum, the numerics -- stop the run with one error listing old -> new, unless named in
`checkpoint.allow_config_change`. Everything else (epochs, lr schedule, logging, eval, checkpointing, ...)
passes with a note. config.yaml in the run dir is never overwritten silently: a changed one is first moved
to config_history/.
"""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from mmcoconut.config import ConfigError, resolve_key

# section -> keys that change the run's semantics; a whole section when the value is None
SEMANTIC = {
    "model": None,
    "curriculum": None,
    "data": ("train_shards", "samples_per_epoch", "resampled", "overlong", "shuffle_buffer", "num_workers"),
    "train": ("seed", "micro_batch_size", "precision"),
}
WHY = {"model": "model/tokenizer", "curriculum": "curriculum", "data": "data stream", "train": "numerics/data order"}


def _flat(d: dict) -> dict:
    return {f"{s}.{k}": v for s, sec in d.items() if isinstance(sec, dict) for k, v in sec.items()}


def is_semantic(key: str) -> bool:
    section, _, name = key.partition(".")
    if section not in SEMANTIC:
        return False
    keys = SEMANTIC[section]
    return keys is None or name in keys


def diff(old: dict, new: dict) -> dict[str, tuple]:
    """{'section.key': (old, new)} for the keys of `new` whose value differs. A key the old config does not have
    (added to mmcoconut since) counts as its default; keys only the old config has are ignored."""
    from mmcoconut.config import Config

    a, b = {**_flat(Config().to_dict()), **_flat(old)}, _flat(new)
    return {k: (a.get(k), v) for k, v in b.items() if a.get(k) != v}


def _fmt(changes: dict) -> str:
    return ", ".join(f"{k} {o!r} -> {n!r}" for k, (o, n) in changes.items())


def check(old: dict, new: dict, allow: list[str], where: str) -> list[str]:
    """old/new: resolved configs (Config.to_dict()); allow: checkpoint.allow_config_change. Raise ConfigError
    for semantic changes not allowed; return note lines for the rest (empty: no drift)."""
    allowed = set()
    for k in allow:
        section, name = resolve_key(k, "checkpoint.allow_config_change")
        allowed.add(f"{section}.{name}")
    changes = diff(old, new)
    changes.pop("checkpoint.resume", None)
    changes.pop("checkpoint.allow_config_change", None)
    bad = {k: v for k, v in changes.items() if is_semantic(k) and k not in allowed}
    if bad:
        raise ConfigError(
            f"resuming {where} with a changed config: {_fmt(bad)}. These keys change what the checkpoint means "
            f"({', '.join(sorted({WHY[k.split('.')[0]] for k in bad}))}): start a new run (another train.name or "
            f"logging.run_dir), or accept the change with --checkpoint.allow_config_change={','.join(bad)}")
    notes = []
    forced = {k: v for k, v in changes.items() if is_semantic(k)}
    rest = {k: v for k, v in changes.items() if not is_semantic(k)}
    if forced:
        notes.append(f"resuming {where} with allowed changes (checkpoint.allow_config_change): {_fmt(forced)}")
    if rest:
        notes.append(f"resuming {where} with changed settings: {_fmt(rest)}")
    return notes


def write_config(run_dir, cfg) -> tuple[Path, dict]:
    """Write <run_dir>/config.yaml; a different existing one is moved to config_history/<time>.yaml first.
    Returns (path of the moved file or None, {key: (old, new)})."""
    run_dir = Path(run_dir)
    path, text = run_dir / "config.yaml", cfg.to_yaml()
    moved, changes = None, {}
    if path.is_file():
        old_text = path.read_text()
        if old_text == text:
            return None, {}
        try:
            changes = diff(yaml.safe_load(old_text) or {}, cfg.to_dict())
        except yaml.YAMLError:
            changes = {}
        hist = run_dir / "config_history"
        hist.mkdir(exist_ok=True)
        moved = hist / time.strftime("config-%Y%m%d-%H%M%S.yaml")
        n = 1
        while moved.exists():
            moved, n = hist / time.strftime(f"config-%Y%m%d-%H%M%S-{n}.yaml"), n + 1
        path.replace(moved)
    from .index import atomic_write

    atomic_write(path, text)
    return moved, changes
