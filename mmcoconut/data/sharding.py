"""Write work items (see sources.py) to WebDataset shards: `<out_dir>/<split>-%06d.tar` holding `<key>.jpg`
(RGB, shorter side resized to `image_size`, JPEG quality 95) and `<key>.json` (UTF-8 record), plus

- `<out_dir>/sizes.json`: shard basename -> sample count (open_clip's convention), merged with other splits';
- `<out_dir>/errors.jsonl`: one `{"split", "key", "source", "reason"}` line per skipped item; this split's old
  lines are replaced, other splits' kept.
- `<out_dir>/questions.jsonl`: one `{"split", "shard", "key", "question_id", "mc", "da"}` line per written sample, in
  tar order (mc / da: whether the official scorer counts the question in that mode); this split's old lines are
  replaced. Evaluation reads it to name and count the questions of a truncated or lost shard exactly.

Images are decoded/drawn and encoded in a process pool (ordered `imap`), while the main process alone writes, so the
shards are byte-identical for any number of workers (tar mtimes are fixed too).
"""
from __future__ import annotations

import io
import json
import os
import re
import time
from collections import deque
from itertools import islice
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Iterator, Optional

from PIL import Image

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


def _ordered_results(tasks: Iterator, workers: int, chunksize: int) -> Iterator:
    """`pool.imap` over `tasks` with at most two windows in flight (plain imap would read the whole input into
    its queue, which matters for millions of synthetic items)."""
    if workers <= 1:
        yield from map(_process, tasks)
        return
    window = workers * chunksize * 16
    with Pool(workers) as pool:
        pending: deque = deque()
        while batch := list(islice(tasks, window)):
            pending.append(pool.imap(_process, batch, chunksize))
            if len(pending) > 1:
                yield from pending.popleft()
        while pending:
            yield from pending.popleft()


def _write_json_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _update_sizes(out_dir: Path, split: str, sizes: dict[str, int]) -> None:
    path = out_dir / "sizes.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    is_ours = shard_name_regex(split).match
    merged = {k: v for k, v in old.items() if not is_ours(k)}
    merged.update(sizes)
    _write_json_atomic(path, json.dumps(dict(sorted(merged.items())), indent=2) + "\n")


def _update_errors(out_dir: Path, split: str, errors: list[dict], name: str = "errors.jsonl") -> None:
    path = out_dir / name
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("split") == split:
                    continue
            except (ValueError, AttributeError):
                pass  # keep lines we do not understand
            kept.append(line)
    lines = kept + [json.dumps(e, ensure_ascii=False) for e in errors]
    _write_json_atomic(path, "".join(line + "\n" for line in lines))


def question_entry(split: str, shard: str, key: str, record: dict) -> dict:
    """The questions.jsonl line of one written sample."""
    mc = record.get("correct_choice_idx") is not None and bool(record.get("choices"))
    da = bool(record.get("direct_answers")) and not record.get("difficult_direct_answer", False)
    return {"split": split, "shard": shard, "key": key, "question_id": str(record.get("question_id", key)),
            "mc": mc, "da": da}


def _remove_old_shards(out_dir: Path, split: str) -> None:
    """A rerun replaces the split: stale higher-numbered shards of a bigger earlier run must not linger."""
    is_ours = shard_name_regex(split).match
    for path in out_dir.iterdir():
        if is_ours(path.name):
            path.unlink()


def write_shards(items: Iterable[WorkItem], out_dir: str | Path, split: str, maxcount: int = 1000,
                 image_size: int = 224, workers: int = 1, max_errors: int = 0, total: Optional[int] = None,
                 progress: bool = True, chunksize: int = 8) -> dict:
    """Shard `items` into `<out_dir>/<split>-%06d.tar` and return a summary dict:
    split, out_dir, written, skipped, shards, seconds, samples_per_s, errors (the skipped items),
    ok (= skipped <= max_errors; max_errors < 0 tolerates any number)."""
    import webdataset as wds
    from tqdm import tqdm

    if not SPLIT_NAME.match(split):
        raise ValueError(f"split name must match {SPLIT_NAME.pattern} (it names the shard files), got {split!r}")
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_old_shards(out_dir, split)
    if total is None and hasattr(items, "__len__"):
        total = len(items)

    start = time.perf_counter()
    sizes: dict[str, int] = {}
    errors: list[dict] = []
    questions: list[dict] = []
    seen: set[str] = set()
    pattern = str(out_dir).replace("%", "%%") + f"/{split}-%06d.tar"
    tasks = ((item, image_size) for item in items)
    with tqdm(total=total, desc=f"shards {split}", unit="sample", disable=not progress, smoothing=0.05) as bar, \
            wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, mtime=TAR_MTIME, format="PAX_FORMAT") as sink:
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
            questions.append(question_entry(split, name, item.key, item.record))
    if not sizes:  # ShardWriter opens its first tar eagerly; do not leave an empty shard behind
        (out_dir / f"{split}-000000.tar").unlink(missing_ok=True)
    _update_sizes(out_dir, split, sizes)
    _update_errors(out_dir, split, errors)
    _update_errors(out_dir, split, questions, "questions.jsonl")

    seconds = time.perf_counter() - start
    written = sum(sizes.values())
    return {
        "split": split, "out_dir": str(out_dir), "written": written, "skipped": len(errors), "shards": len(sizes),
        "seconds": round(seconds, 3), "samples_per_s": round(written / seconds, 1) if seconds > 0 else 0.0,
        "errors": errors, "ok": max_errors < 0 or len(errors) <= max_errors,
    }
