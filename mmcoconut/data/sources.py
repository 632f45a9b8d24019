"""Readers that turn the three data sources into work items for `sharding.write_shards`.

A work item is `WorkItem(key, record, image, error)`:
- `key`: the sample key in the tar (the question_id with '.' and '/' replaced by '_': webdataset splits a member
  name at its first '.', and '/' would make a directory inside the tar). The json keeps `question_id` verbatim.
- `record`: the shard json (docs/internals.md, "Shard sample").
- `image`: a picklable callable `image(size) -> PIL.Image` (run inside the worker pool); `size` is only a hint
  that lets synthetic images be drawn at their final resolution.
- `error`: None, or why the entry is malformed; such an item is skipped and logged, never raised.
Readers never touch image files: missing or corrupt images are found (and reported) by the workers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

from PIL import Image

from ..modeling.images import load_rgb
from ..modeling.prompt import choices_suffix
from . import synthetic

AOKVQA_SPLITS = ("train", "val", "test")


class WorkItem(NamedTuple):
    key: str
    record: dict
    image: Optional[Callable[[int], Image.Image]]
    error: Optional[str] = None


class FileImage:
    """Loads an image file as RGB (transparent pixels composited on white). No EXIF rotation: the annotations of
    COCO refer to the stored pixels."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, size: int) -> Image.Image:
        return load_rgb(self.path)


class SyntheticImage:
    """Draws a synthetic scene (see synthetic.draw_image)."""

    def __init__(self, scene: list):
        self.scene = scene

    def __call__(self, size: int) -> Image.Image:
        return synthetic.draw_image({"scene": self.scene}, size=size)


def sanitize_key(question_id: str) -> str:
    return question_id.replace(".", "_").replace("/", "_")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _error(key: str, source: str, reason: str) -> WorkItem:
    return WorkItem(key or "<empty>", {"source": source}, None, reason)


# --------------------------------------------------------------------------------------------- official A-OKVQA
def aokvqa_paths(aokvqa_dir: str | Path, coco_dir: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation json, COCO image dir) of an official split: A-OKVQA train/val/test use COCO-2017
    train2017/val2017/test2017."""
    if split not in AOKVQA_SPLITS:
        raise ValueError(f"A-OKVQA split must be one of {AOKVQA_SPLITS}, got {split!r}")
    return Path(aokvqa_dir) / f"aokvqa_v1p0_{split}.json", Path(coco_dir) / f"{split}2017"


def _check_aokvqa(entry: Any) -> Optional[str]:
    if not isinstance(entry, dict):
        return f"entry is {type(entry).__name__}, not an object"
    qid = entry.get("question_id")
    if not isinstance(qid, str) or not qid:
        return "question_id missing or not a non-empty string"
    if not isinstance(entry.get("question"), str):
        return "question missing or not a string"
    if not _is_int(entry.get("image_id")):
        return "image_id missing or not an integer"
    choices = entry.get("choices")
    if not _is_str_list(choices) or not choices:
        return "choices missing or not a non-empty list of strings"
    if "correct_choice_idx" in entry:
        idx = entry["correct_choice_idx"]
        if not _is_int(idx) or not 0 <= idx < len(choices):
            return f"correct_choice_idx {idx!r} is not an index into {len(choices)} choices"
    for field in ("rationales", "direct_answers"):
        if field in entry and not _is_str_list(entry[field]):
            return f"{field} is not a list of strings"
    return None


def aokvqa_record(entry: dict) -> dict:
    """Official fields verbatim + the training view (question with enumerated choices, steps, answer)."""
    record = dict(entry)
    record["raw_question"] = entry["question"]
    record["question"] = entry["question"] + choices_suffix(entry["choices"])
    record["steps"] = list(entry.get("rationales") or [])
    record["answer"] = str(entry["correct_choice_idx"]) if "correct_choice_idx" in entry else ""
    record["source"] = "aokvqa"
    return record


def aokvqa_records(aokvqa_dir: str | Path, coco_dir: str | Path, split: str) -> Iterator[WorkItem]:
    ann_path, image_dir = aokvqa_paths(aokvqa_dir, coco_dir, split)
    entries = json.loads(ann_path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{ann_path}: expected a json list of questions, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        reason = _check_aokvqa(entry)
        if reason:
            qid = entry.get("question_id") if isinstance(entry, dict) else None
            yield _error(sanitize_key(qid) if isinstance(qid, str) else f"{split}-entry-{i:08d}", "aokvqa", reason)
            continue
        image_path = image_dir / f"{entry['image_id']:012d}.jpg"
        yield WorkItem(sanitize_key(entry["question_id"]), aokvqa_record(entry), FileImage(str(image_path)))


# ----------------------------------------------------------------------------------------------- seed json list
def _check_json_entry(entry: Any) -> Optional[str]:
    if not isinstance(entry, dict):
        return f"entry is {type(entry).__name__}, not an object"
    if not isinstance(entry.get("image"), str) or not entry["image"]:
        return "image missing or not a non-empty string path"
    if not isinstance(entry.get("question"), str):
        return "question missing or not a string"
    if not _is_str_list(entry.get("steps")):
        return "steps missing or not a list of strings"
    if not (isinstance(entry.get("answer"), str) or _is_int(entry.get("answer"))):
        return "answer missing or not a string/integer"
    return None


def json_records(path: str | Path) -> Iterator[WorkItem]:
    """Entries of a json list `[{image, question, steps, answer, ...}]`. Image paths are relative to the json's
    directory (absolute paths also work); extra fields are kept verbatim; `source` is set to "json"."""
    path = Path(path)
    entries = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a json list of entries, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        qid = None
        if isinstance(entry, dict):
            qid = entry.get("question_id", entry.get("id"))
        qid = str(qid) if qid is not None else f"{path.stem}-{i:08d}"
        key = sanitize_key(qid)
        reason = _check_json_entry(entry) or (None if key else "question_id is empty")
        if reason:
            yield _error(key, "json", reason)
            continue
        record = dict(entry)
        record["question_id"] = qid
        record["answer"] = str(entry["answer"])
        record["source"] = "json"
        yield WorkItem(key, record, FileImage(str(path.parent / entry["image"])))  # '/' on an absolute path wins


# -------------------------------------------------------------------------------------------------- synthetic
def synthetic_records(n: int, seed: int, list_choices: bool = True) -> Iterator[WorkItem]:
    """n synthetic samples (lazily generated; images are drawn by the workers)."""
    for record in synthetic.iter_records(n, seed, list_choices):
        yield WorkItem(record["question_id"], record, SyntheticImage(record["scene"]))
