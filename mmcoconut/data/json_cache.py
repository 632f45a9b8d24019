"""Shards for a raw json list given as training data (the seed configs' train_path / val_path), made once.

`<dir>/<stem>.json` is sharded into the cache `<dir>/<stem>.shards/` (split `train` or `val`, by the config key that
named it) the first time a run meets it, and reused while the json is unchanged (its size and sha256 are
recorded in the cache). Crash-safe: the shards are written to a temporary sibling dir that is renamed into place only
when complete, so a killed sharding leaves nothing the next run trusts; ranks and concurrent runs take a file lock,
and one shards while the others wait and reuse its result. Any entry that cannot be sharded (missing image,
malformed entry) is an error: nothing is dropped silently (shard by hand with mmcoconut-shard --max-errors N).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

FINGERPRINT = "mmcoconut-cache.json"


def cache_dir(json_path: Path) -> Path:
    return json_path.parent / f"{json_path.stem}.shards"


def fingerprint(json_path: Path) -> dict:
    st = json_path.stat()
    h = hashlib.sha256()
    with open(json_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"json": json_path.name, "size": st.st_size, "sha256": h.hexdigest()}


def _cached_split(cache: Path, fp: dict):
    """The split of a complete cache made from this very json, else None."""
    try:
        rec = json.loads((cache / FINGERPRINT).read_text())
    except (OSError, ValueError):
        return None
    same = isinstance(rec, dict) and all(rec.get(k) == v for k, v in fp.items())
    return rec.get("split") if same else None


def _shard(json_path: Path, out: Path, split: str) -> dict:
    from .sharding import write_shards
    from .sources import json_records

    items = list(json_records(json_path))
    return write_shards(items, out, split, workers=min(4, os.cpu_count() or 1), max_errors=0, total=len(items),
                        progress=False)


def shards_for_json(json_path, split: str, key: str, announce=print) -> str:
    """The shard spec (`<cache>/<split>`) for `json_path`, sharding it first when no valid cache exists.
    ValueError (one line, naming `key` and the json) when the json cannot be sharded completely."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise ValueError(f"{key}={json_path}: no such file")
    cache = cache_dir(json_path)
    fp = fingerprint(json_path)  # (outside the lock: ranks hash in parallel)
    with open(json_path.parent / f".{json_path.stem}.shards.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one rank/run shards, the others wait and reuse
        have = _cached_split(cache, fp)
        if have is not None:
            return str(cache / have)
        if cache.exists() and not (cache / FINGERPRINT).is_file():
            raise ValueError(f"{key}={json_path}: {cache} exists and is not mmcoconut's cache of this json (no "
                             f"{FINGERPRINT}); move it, or set {key} to its shards")
        for stale in json_path.parent.glob(f".{cache.name}.tmp-*"):  # left by a killed sharding
            shutil.rmtree(stale, ignore_errors=True)
        announce(f"data: {key}={json_path} is a json list, not shards: sharding it once into {cache}/ "
                 "(reused while the json is unchanged; mmcoconut-shard --json does the same by hand)")
        tmp = json_path.parent / f".{cache.name}.tmp-{os.getpid()}"
        try:
            try:
                summary = _shard(json_path, tmp, split)
            except ValueError as e:  # (json.JSONDecodeError too)
                raise ValueError(f"{key}={json_path}: not a valid json list of entries: {e}") from None
            if summary["skipped"] or not summary["written"]:
                first = summary["errors"][0] if summary["errors"] else None
                why = f"first: {first['key']}: {first['reason']}" if first else "the list is empty"
                raise ValueError(
                    f"{key}={json_path}: {summary['skipped']} of {summary['written'] + summary['skipped']} entries "
                    f"could not be sharded ({why}); fix the json, or shard it by hand with mmcoconut-shard --json "
                    f"{json_path} --split {split} --max-errors N --out DIR and set {key} to DIR/{split}")
            (tmp / FINGERPRINT).write_text(json.dumps({**fp, "split": split}, indent=1))
            shutil.rmtree(cache, ignore_errors=True)  # an invalid old cache; a crash from here leaves none at all
            os.replace(tmp, cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(cache / split)
