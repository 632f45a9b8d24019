"""The run dir's record of complete checkpoints, crash-consistent.

- `<run_dir>/<tag>/mmcoconut.json` (META) is the completeness marker of a checkpoint: written by rank 0 after every
  rank's DeepSpeed files are on disk, via temp file + fsync + rename, and listing every file of the tag dir with
  its size, so a truncated or missing file makes the tag incomplete.
- `<run_dir>/checkpoints.json` (INDEX): the complete tags, oldest first, also written via temp file + rename.

At start (rank 0, under the run-dir lock) `recover()` removes partial tag dirs (a save or a prune that was killed),
rebuilds an unreadable or stale index from the complete tag dirs with a warning, points DeepSpeed's `latest` at
the newest complete tag, and clears leftover temp files.
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


def read_meta(run_dir, tag: str) -> dict:
    return json.loads((Path(run_dir) / tag / META).read_text())


def check_complete(run_dir, tag: str) -> Optional[str]:
    """None when `<run_dir>/<tag>` is a complete checkpoint, else why not."""
    d = Path(run_dir) / tag
    try:
        meta = read_meta(run_dir, tag)
    except FileNotFoundError:
        return f"no {META} (the save did not finish)"
    except (OSError, ValueError) as e:
        return f"unreadable {META}: {e}"
    for name, size in (meta.get("files") or {}).items():
        try:
            actual = (d / name).stat().st_size
        except OSError:
            return f"file {name} is missing"
        if actual != size:
            return f"file {name} has {actual} bytes, {size} were written"
    return None


def _order_key(run_dir, tag: str):
    m = read_meta(run_dir, tag)
    return (m.get("step", 0), m.get("saved_at", 0.0), bool(m.get("epoch_done")), tag)


def complete_tags(run_dir) -> list[str]:
    """Complete checkpoint dirs (any tag name with a valid META), oldest first by (step, save time)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    tags = [p.name for p in run_dir.iterdir() if p.is_dir() and (p / META).is_file() and
            not p.name.endswith(UNIVERSAL_SUFFIX) and check_complete(run_dir, p.name) is None]
    return sorted(tags, key=lambda t: _order_key(run_dir, t))


# ---------------------------------------------------------------- INDEX (per run)
def read_index(run_dir) -> Optional[list[str]]:
    """The index as written, or None when missing / torn / not a list of tags."""
    p = Path(run_dir) / INDEX
    try:
        tags = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return tags if isinstance(tags, list) and all(isinstance(t, str) for t in tags) else None


def write_index(run_dir, tags: list[str]) -> None:
    atomic_write(Path(run_dir) / INDEX, json.dumps(tags))


def list_tags(run_dir, warn: bool = True) -> list[str]:
    """Complete checkpoints of a run, oldest first: the index order, checked against the tag dirs. Read-only;
    a torn or stale index is reconstructed from the complete tag dirs (with a warning), `recover()` rewrites it."""
    run_dir = Path(run_dir)
    idx = read_index(run_dir)
    if idx is None and not (run_dir / INDEX).exists():
        found = complete_tags(run_dir)
        if found and warn:
            _warn(f"{run_dir}: no {INDEX}, but complete checkpoints {found}: using them")
        return found
    if idx is None:
        found = complete_tags(run_dir)
        if warn:
            _warn(f"{run_dir / INDEX} is unreadable (torn write?): rebuilt from the complete checkpoint dirs: {found}")
        return found
    ok = [t for t in idx if check_complete(run_dir, t) is None]
    extra = [t for t in complete_tags(run_dir) if t not in ok and t not in idx]
    if extra:  # complete, but the process died before recording it (or after pruning started)
        if warn:
            _warn(f"{run_dir}: complete checkpoint(s) {extra} missing from {INDEX}: adopting them")
        ok = sorted(ok + extra, key=lambda t: _order_key(run_dir, t))
    return ok


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
    """DeepSpeed's `latest` (export tools read it) must never name a removed partial tag."""
    latest = Path(run_dir) / "latest"
    if latest.is_file() and latest.read_text().strip() not in tags:
        if tags:
            atomic_write(latest, tags[-1])
        else:
            latest.unlink()


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
