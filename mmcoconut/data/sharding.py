"""Write work items (see sources.py) to WebDataset shards: `<out_dir>/<split>-%06d.tar` holding `<key>.jpg`
(RGB, shorter side resized to `image_size`, JPEG quality 95) and `<key>.json` (UTF-8 record), plus

- `<out_dir>/sizes.json`: shard basename -> sample count (open_clip's convention), merged with other splits';
- `<out_dir>/steps.json`: shard basename -> longest `steps` list in it (the training pre-flight compares it with
  the curriculum's last stage), merged the same way;
- `<out_dir>/errors.jsonl`: one `{"split", "key", "source", "reason"}` line per skipped item; this split's old
  lines are replaced, other splits' kept.
- `<out_dir>/questions.jsonl`: one `{"split", "shard", "key", "question_id", "mc", "da"}` line per written sample, in
  tar order (mc / da: whether the official scorer counts the question in that mode); this split's old lines are
  replaced. Evaluation reads it to name and count the questions of a truncated or lost shard exactly.

Images are decoded/drawn and encoded in a process pool (ordered `imap`), while the main process alone writes, so the
shards are byte-identical for any number of workers (tar mtimes are fixed too). `out_dir` may be remote (an fsspec
URL, or `pipe:CMD` with `{}` for the file name): each finished shard is uploaded from a local staging dir.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections import deque
from itertools import islice
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Iterator, Optional

from PIL import Image

from . import remote
from .sources import WorkItem

JPEG_QUALITY = 95
TAR_MTIME = 946684800  # 2000-01-01: a fixed member mtime makes tars reproducible
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def shard_name_regex(split: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so that min(width, height) == size, keeping the aspect ratio (size <= 0: unchanged)."""
    w, h = img.size
    if size <= 0 or min(w, h) == size:
        return img
    if w <= h:
        new = (size, max(1, round(h * size / w)))
    else:
        new = (max(1, round(w * size / h)), size)
    return img.resize(new, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _process(task: tuple[WorkItem, int]) -> tuple[WorkItem, Optional[bytes], Optional[str]]:
    """Worker: (item, image_size) -> (item, jpeg bytes or None, error or None). Never raises on bad data."""
    item, image_size = task
    if item.error is not None:
        return item, None, item.error
    try:
        img = resize_shorter_side(item.image(image_size), image_size)
        return item, encode_jpeg(img), None
    except FileNotFoundError:
        return item, None, f"missing image: {getattr(item.image, 'path', '?')}"
    except Exception as exc:  # PIL raises many types for corrupt/truncated/unsupported files
        return item, None, f"unreadable image: {getattr(item.image, 'path', '?')}: {type(exc).__name__}: {exc}"


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _default_signals() -> None:
    """Pool worker initializer: default stop-signal handling, no inherited wakeup fd, then the stop signals
    unblocked (the pool is forked with them blocked, so one sent before this point waits and then acts as default).
    A caller with its own handlers (the trainer shards a seed json at start: train/signals.py) would otherwise leave
    workers that ignore the pool's terminate() (a hang) and write each signal they get into its wakeup pipe."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _pool(workers: int) -> Pool:
    """A process pool whose workers never run the caller's stop-signal handlers (see _default_signals)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return Pool(workers, initializer=_default_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _ordered_results(tasks: Iterator, workers: int, chunksize: int) -> Iterator:
    """`pool.imap` over `tasks` with at most two windows in flight (plain imap would read the whole input into
    its queue, which matters for millions of synthetic items)."""
    if workers <= 1:
        yield from map(_process, tasks)
        return
    window = workers * chunksize * 16
    with _pool(workers) as pool:
        pending: deque = deque()
        while batch := list(islice(tasks, window)):
            pending.append(pool.imap(_process, batch, chunksize))
            if len(pending) > 1:
                yield from pending.popleft()
        while pending:
            yield from pending.popleft()


class _Out:
    """The output of write_shards: a local dir, or a remote target (remote.Target) fed from a local staging dir
    one finished shard at a time (so the local disk holds at most one shard)."""

    def __init__(self, out):
        out = str(out)
        self.remote = None if remote.kind(out) == "local" else remote.Target(out)
        if self.remote is None:
            self.dir = Path(remote.local_path(out))
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="mmcoconut-shards-"))

    @property
    def readable(self) -> bool:
        return self.remote is None or self.remote.readable

    def names(self) -> list[str]:
        return os.listdir(self.dir) if self.remote is None else self.remote.names() if self.readable else []

    def read_text(self, name: str) -> Optional[str]:
        if self.remote is None:
            path = self.dir / name
            return path.read_text(encoding="utf-8") if path.exists() else None
        return self.remote.read_text(name) if self.readable else None

    def write_text(self, name: str, text: str) -> None:
        tmp = self.dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.dir / name)  # atomic locally
        self.publish(self.dir / name)

    def remove(self, name: str) -> None:
        if self.remote is None:
            (self.dir / name).unlink()
        else:
            self.remote.remove(name)

    def publish(self, path: Path) -> None:
        if self.remote is not None:
            self.remote.put(str(path), path.name)
            path.unlink()

    def where(self, name: str = "") -> str:
        return str(self.dir / name) if self.remote is None else self.remote.where(name) if name else self.remote.out

    def close(self) -> None:
        if self.remote is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def _update_sizes(out: _Out, split: str, sizes: dict[str, int], name: str = "sizes.json") -> None:
    old = json.loads(out.read_text(name) or "{}")
    is_ours = shard_name_regex(split).match
    merged = {k: v for k, v in old.items() if not is_ours(k)}
    merged.update(sizes)
    out.write_text(name, json.dumps(dict(sorted(merged.items())), indent=2) + "\n")


def _update_errors(out: _Out, split: str, errors: list[dict], name: str = "errors.jsonl") -> None:
    kept = []
    for line in (out.read_text(name) or "").splitlines():
        try:
            if json.loads(line).get("split") == split:
                continue
        except (ValueError, AttributeError):
            pass  # keep lines we do not understand
        kept.append(line)
    lines = kept + [json.dumps(e, ensure_ascii=False) for e in errors]
    out.write_text(name, "".join(line + "\n" for line in lines))


def question_entry(split: str, shard: str, key: str, record: dict) -> dict:
    """The questions.jsonl line of one written sample."""
    mc = record.get("correct_choice_idx") is not None and bool(record.get("choices"))
    da = bool(record.get("direct_answers")) and not record.get("difficult_direct_answer", False)
    return {"split": split, "shard": shard, "key": key, "question_id": str(record.get("question_id", key)),
            "mc": mc, "da": da}


def _remove_old_shards(out: _Out, split: str) -> None:
    """A rerun replaces the split: stale higher-numbered shards of a bigger earlier run must not linger, and
    sizes.json loses the split's entries first, so a run that dies midway leaves no count for a partial split."""
    if not out.readable:
        return  # a pipe: target is write-only (see write_shards' warnings)
    for name in ("sizes.json", "steps.json"):
        if out.read_text(name) is not None:
            _update_sizes(out, split, {}, name)
    is_ours = shard_name_regex(split).match
    for name in out.names():
        if is_ours(name):
            out.remove(name)


def write_shards(items: Iterable[WorkItem], out_dir: str | Path, split: str, maxcount: int = 1000,
                 image_size: int = 224, workers: int = 1, max_errors: int = 0, total: Optional[int] = None,
                 progress: bool = True, chunksize: int = 8) -> dict:
    """Shard `items` into `<out_dir>/<split>-%06d.tar` and return a summary dict:
    split, out_dir, written, skipped, shards, seconds, samples_per_s, errors (the skipped items),
    errors_at (where errors.jsonl went), ok (= skipped <= max_errors; max_errors < 0 tolerates any number), warnings.
    out_dir may also be an fsspec URL (s3://bucket/dir) or 'pipe:CMD' with '{}' for each file name; shards are
    then staged locally one at a time and uploaded when closed, sizes.json last."""
    if not SPLIT_NAME.match(split):
        raise ValueError(f"split name must match {SPLIT_NAME.pattern} (it names the shard files), got {split!r}")
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out = _Out(out_dir)
    try:
        return _write(items, out, split, maxcount, image_size, workers, max_errors, total, progress, chunksize)
    finally:
        out.close()


def _write(items, out: _Out, split, maxcount, image_size, workers, max_errors, total, progress, chunksize) -> dict:
    import webdataset as wds
    from tqdm import tqdm

    _remove_old_shards(out, split)
    if total is None and hasattr(items, "__len__"):
        total = len(items)

    start = time.perf_counter()
    sizes: dict[str, int] = {}
    longest: dict[str, int] = {}  # shard -> longest steps list
    errors: list[dict] = []
    questions: list[dict] = []
    seen: set[str] = set()
    pattern = str(out.dir).replace("%", "%%") + f"/{split}-%06d.tar"
    tasks = ((item, image_size) for item in items)

    def finished(fname: str) -> None:  # a closed shard: upload it (remote), unless it is the empty first one
        if Path(fname).name in sizes:
            out.publish(Path(fname))

    with tqdm(total=total, desc=f"shards {split}", unit="sample", disable=not progress, smoothing=0.05) as bar, \
            wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, mtime=TAR_MTIME, format="PAX_FORMAT",
                            post=finished) as sink:
        for item, jpeg, error in _ordered_results(tasks, workers, chunksize):
            bar.update(1)
            if error is None and item.key in seen:
                error = f"duplicate key {item.key!r} in split {split!r} (the first one was kept)"
            if error is not None:
                errors.append({"split": split, "key": item.key, "source": item.record.get("source", "?"),
                               "reason": error})
                bar.set_postfix(skipped=len(errors), refresh=False)
                continue
            seen.add(item.key)
            record_json = json.dumps(item.record, ensure_ascii=False).encode("utf-8")
            sink.write({"__key__": item.key, "jpg": jpeg, "json": record_json})
            name = Path(sink.fname).name
            sizes[name] = sizes.get(name, 0) + 1
            longest[name] = max(longest.get(name, 0), len(item.record.get("steps") or []))
            questions.append(question_entry(split, name, item.key, item.record))
    if not sizes:  # ShardWriter opens its first tar eagerly; do not leave an empty shard behind
        (out.dir / f"{split}-000000.tar").unlink(missing_ok=True)
    _update_sizes(out, split, longest, "steps.json")
    _update_errors(out, split, questions, "questions.jsonl")
    _update_sizes(out, split, sizes)  # last: a reader never sees counts for shards that are not there yet
    _update_errors(out, split, errors)
    warnings = [] if out.readable else [
        f"{out.where()} is a write-only pipe: target: its sizes.json, steps.json, questions.jsonl and errors.jsonl "
        f"now hold split {split!r} only (other splits' entries cannot be merged); give each split its own "
        "directory, or write to an fsspec URL (s3://..., merged like a local dir), or write locally and upload the "
        "directory"]

    seconds = time.perf_counter() - start
    written = sum(sizes.values())
    return {
        "split": split, "out_dir": out.where(), "written": written, "skipped": len(errors), "shards": len(sizes),
        "seconds": round(seconds, 3), "samples_per_s": round(written / seconds, 1) if seconds > 0 else 0.0,
        "errors": errors, "errors_at": out.where("errors.jsonl"), "ok": max_errors < 0 or len(errors) <= max_errors,
        "warnings": warnings,
    }
