"""The run dir's record of complete checkpoints, crash-consistent.

- `<run_dir>/<tag>/mmcoconut.json` (META) is the completeness marker of a checkpoint: written by rank 0 after every
  rank's DeepSpeed files are on disk, via temp file + fsync + rename, and listing every file of the tag dir with
  its size, so a truncated or missing file makes the tag incomplete.
- `<run_dir>/checkpoints.json` (INDEX): the complete tags, oldest first, also written via temp file + rename.

Which checkpoints exist and which is the newest is decided by the tag dirs and their META alone (by step, then save
time); the index is compared with them and rewritten when it disagrees (torn, not a list of tags, out of order), with
a warning. At start (rank 0, under the run-dir lock) `recover()` removes partial tag dirs (a save or a prune that was
killed), rewrites such an index, points DeepSpeed's `latest` at the newest complete tag (a garbled `latest` is
rewritten) and clears leftover temp files. Nothing it reads can make it raise: an unreadable file counts as absent.
Pruning removes a tag's META first, so a killed prune never leaves a half-deleted dir that looks complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

INDEX, META, UNIVERSAL_SUFFIX = "checkpoints.json", "mmcoconut.json", "_universal"
TAG_RE = re.compile(r"^(step\d+|epoch\d+)$")  # the tags this trainer writes
TMP_RE = re.compile(r"^\..*\.tmp[\w-]*$|.*_universal\.tmp$")


def _warn(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank reads the index; one says so
        print(f"warning: {msg}", file=sys.stderr, flush=True)


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write(path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old or the new content, never a torn file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes 0600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ---------------------------------------------------------------- META (per tag)
def file_sizes(tag_dir) -> dict[str, int]:
    tag_dir = Path(tag_dir)
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != META}


def write_meta(tag_dir, meta: dict) -> None:
    atomic_write(Path(tag_dir) / META, json.dumps(dict(meta, files=file_sizes(tag_dir)), indent=1))


def _load_json(path):
    """The JSON in `path`; ValueError for anything that is not JSON (invalid UTF-8, torn, absurdly nested)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except RecursionError as e:
        raise ValueError("nested too deeply") from e


def read_meta(run_dir, tag: str) -> dict:
    """The tag's META; ValueError when it is not an object of the shape write_meta() writes."""
    meta = _load_json(Path(run_dir) / tag / META)
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    files = meta.setdefault("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and type(v) is int for k, v in files.items()):
        raise ValueError("'files' is not a map of file names to sizes")
    if type(meta.get("step")) is not int or type(meta.get("world_size", 1)) is not int:
        raise ValueError("no integer 'step', or 'world_size' is not an integer")
    if not isinstance(meta.get("saved_at", 0.0), (int, float)) or not isinstance(meta.get("engine", ""), str):
        raise ValueError("'saved_at' is not a number or 'engine' not a string")
    return meta


def check_complete(run_dir, tag: str) -> Optional[str]:
    """None when `<run_dir>/<tag>` is a complete checkpoint, else why not."""
    d = Path(run_dir) / tag
    try:
        meta = read_meta(run_dir, tag)
    except FileNotFoundError:
        return f"no {META} (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable {META}: {e}"
    for name, size in meta["files"].items():
        try:
            actual = (d / name).stat().st_size
        except (OSError, ValueError):
            return f"file {name} is missing"
        if actual != size:
            return f"file {name} has {actual} bytes, {size} were written"
    return None


def _order_key(run_dir, tag: str):
    m = read_meta(run_dir, tag)
    return (m["step"], float(m.get("saved_at", 0.0)), bool(m.get("epoch_done")), tag)


def complete_tags(run_dir) -> list[str]:
    """Complete checkpoint dirs (any tag name with a valid META), oldest first by (step, save time)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    try:
        names = [p.name for p in run_dir.iterdir() if not p.name.endswith(UNIVERSAL_SUFFIX)]
    except OSError:
        return []
    tags = [t for t in names if os.path.isfile(run_dir / t / META) and check_complete(run_dir, t) is None]
    return sorted(tags, key=lambda t: _order_key(run_dir, t))


# ---------------------------------------------------------------- INDEX (per run)
def read_index(run_dir) -> Optional[list[str]]:
    """The index as written, or None when missing / torn / not a list of tag names."""
    try:
        tags = _load_json(Path(run_dir) / INDEX)
    except (OSError, ValueError):
        return None
    ok = isinstance(tags, list) and all(isinstance(t, str) and t and "/" not in t and t not in (".", "..")
                                        for t in tags)
    return tags if ok else None


def write_index(run_dir, tags: list[str]) -> None:
    atomic_write(Path(run_dir) / INDEX, json.dumps(tags))


def list_tags(run_dir, warn: bool = True) -> list[str]:
    """Complete checkpoints of a run, oldest first by (step, save time), from the tag dirs and their META. Read-only:
    the index is only compared, and a missing, torn, stale or out-of-order one gets a warning (`recover()`
    rewrites it); it never decides which checkpoint is the newest."""
    run_dir = Path(run_dir)
    found = complete_tags(run_dir)
    if not warn:
        return found
    idx = read_index(run_dir)
    if idx is None and not os.path.lexists(run_dir / INDEX):
        if found:
            _warn(f"{run_dir}: no {INDEX}, but complete checkpoints {found}: using them")
    elif idx is None:
        _warn(f"{run_dir / INDEX} is unreadable (torn write?) or not a list of checkpoint tags: rebuilt from the "
              f"complete checkpoint dirs: {found}")
    else:
        extra = [t for t in found if t not in idx]
        if extra:  # complete, but the process died before recording it (or after pruning started)
            _warn(f"{run_dir}: complete checkpoint(s) {extra} missing from {INDEX}: adopting them")
        listed = [t for t in idx if t in found]
        if listed != [t for t in found if t in listed]:
            _warn(f"{run_dir / INDEX} lists the checkpoints in another order than their steps ({listed}): using "
                  f"the step order, newest {found[-1]}")
    return found


def recover(run_dir) -> list[str]:
    """Start-of-run repair (rank 0, under the run-dir lock): remove partial tag dirs and temp files, rewrite the
    index when it is unreadable or differs from the complete tags. Returns the complete tags."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    for p in sorted(run_dir.iterdir()):
        if TMP_RE.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        elif p.is_dir() and TAG_RE.match(p.name):
            why = check_complete(run_dir, p.name)
            if why is not None:
                _warn(f"removing partial checkpoint {p} ({why})")
                shutil.rmtree(p, ignore_errors=True)
                shutil.rmtree(run_dir / (p.name + UNIVERSAL_SUFFIX), ignore_errors=True)
    tags = list_tags(run_dir, warn=False)  # (plan_resume has said what it found)
    if read_index(run_dir) != tags and (tags or (run_dir / INDEX).exists()):
        write_index(run_dir, tags)
        _warn(f"rewrote {run_dir / INDEX} from the complete checkpoint dirs: {tags}")
    fix_latest(run_dir, tags)
    return tags


def fix_latest(run_dir, tags: list[str]) -> None:
    """DeepSpeed's `latest` (export tools read it) must never name a removed partial tag; a garbled or unreadable
    one is rewritten (or removed when there is no checkpoint) with a warning. Never raises."""
    latest = Path(run_dir) / "latest"
    garbled = None
    try:
        if not latest.is_file():
            return
        name = latest.read_bytes().decode("utf-8").strip()
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:  # unreadable, invalid UTF-8
        name, garbled = None, f"{type(e).__name__}: {e}"[:200]
    if name in tags:
        return
    if garbled is None and not TAG_RE.match(name):  # (a tag name: a save that was killed, the usual case)
        garbled = f"it names {name[:60]!r}, not a checkpoint tag"
    try:
        atomic_write(latest, tags[-1]) if tags else latest.unlink()
    except OSError as e:
        _warn(f"could not repair {latest} ({e}); training does not read it, export tools do")
        return
    if garbled:
        _warn(f"{latest} was garbled ({garbled}): " + (f"now names {tags[-1]}" if tags else "removed"))


def prune(run_dir, tags: list[str], keep: int) -> list[str]:
    """Record `tags[-keep:]` in the index, then delete the older ones (META first). Returns the kept tags."""
    run_dir = Path(run_dir)
    kept, old = tags[-keep:], tags[:-keep]
    write_index(run_dir, kept)
    for t in old:
        (run_dir / t / META).unlink(missing_ok=True)
        shutil.rmtree(run_dir / t, ignore_errors=True)
        shutil.rmtree(run_dir / (t + UNIVERSAL_SUFFIX), ignore_errors=True)
    return kept
