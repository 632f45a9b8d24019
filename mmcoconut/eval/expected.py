"""The expected question set of an evaluation: the denominator of MC and DA.

Without it, samples lost before generation (a truncated or missing shard, a corrupt or overlong sample, a crash
of one rank) would silently leave the denominator. The official A-OKVQA scorer averages over every question of
its annotation file and scores a missing prediction 0; so do we, over:

- the annotation file when one is given (`eval.annotations` / `--annotations`): every question in it;
- otherwise the shards: every readable sample's json (the shard json keeps the official fields) plus, for each
  shard, the samples its `sizes.json` count declares but the tar does not hold (truncated or corrupt), and,
  for a directory or `dir/<split>` spec, the shards that `sizes.json` lists but that are gone. These lost
  samples score 0; `questions.jsonl` (written by mmcoconut-shard next to sizes.json) names them and says whether
  the official scorer counts each in MC / DA, so the figures equal the official ones; without it (shards
  written by other tools) a lost sample counts in both modes and a note says the DA may differ.

With `max_samples` the set is the subset at positions [0, max_samples) (position = shard offset from sizes.json +
index in the shard, the EvalLoader's order), and it is reported as a subset.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from ..data.eval_loader import positioned_samples
from ..data.shardlist import ShardReader
from ..data.shardlist import expand_shards, shard_sizes

_SHARD = re.compile(r"^(?P<split>.+)-\d{6}\.tar$")


@dataclass
class Expected:
    """records: question_id -> record (official fields), in position order; unknown: (position, reason, flags)
    of declared samples whose record could not be read, flags = their questions.jsonl line ({question_id, mc,
    da}) or None when unknown; key_to_qid: tar sample key -> question_id;
    missing_reason: question_id -> why it can have no prediction, known before generation."""
    records: dict = field(default_factory=dict)
    unknown: list = field(default_factory=list)
    key_to_qid: dict = field(default_factory=dict)
    missing_reason: dict = field(default_factory=dict)
    source: str = "shards"
    subset: Optional[int] = None
    notes: list = field(default_factory=list)

    @property
    def n_expected(self) -> int:
        return len(self.records) + len(self.unknown)


def _sibling_shards(spec: str, urls: list[str]) -> list[tuple[str, int]]:
    """(path, declared count) of shards that sizes.json lists for a directory / dir/<split> spec part but that
    are not on disk (a deleted or never-copied shard). Explicit files and brace patterns name their own set."""
    out, present = [], {os.path.abspath(u) for u in urls}
    for part in spec.split("::"):
        if os.path.isfile(part) or "{" in part:
            continue
        folder, split = (part, None) if os.path.isdir(part) else (os.path.dirname(part) or ".", os.path.basename(part))
        sizes_path = os.path.join(folder, "sizes.json")
        if not os.path.isfile(sizes_path):
            continue
        try:
            sizes = json.load(open(sizes_path))
        except (OSError, ValueError):
            continue
        for name, n in sorted(sizes.items()):
            m = _SHARD.match(name)
            path = os.path.join(folder, name)
            if m and (split is None or m["split"] == split) and os.path.abspath(path) not in present:
                out.append((path, int(n)))
    return out


def _manifests(urls: list[str]) -> dict:
    """shard path -> its questions.jsonl lines in tar order (shards whose folder has the file)."""
    out: dict = {}
    for folder in sorted({os.path.dirname(u) for u in urls}):
        path = os.path.join(folder, "questions.jsonl")
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        q = json.loads(line)
                        out.setdefault(os.path.join(folder, q["shard"]), []).append(q)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable manifest only costs exactness: lost samples count as unknown
    return out


def _flags(manifest: dict, shard: str, index: int, declared: int) -> Optional[dict]:
    """The questions.jsonl line of sample `index` of `shard`, if the manifest agrees with sizes.json."""
    lines = manifest.get(shard)
    if not lines or len(lines) != declared or index >= len(lines):
        return None
    q = lines[index]
    return {"question_id": str(q.get("question_id")), "mc": bool(q.get("mc")), "da": bool(q.get("da"))}


def _read_json(raw: dict) -> Optional[dict]:
    try:
        rec = json.loads(raw["json"])
    except (KeyError, ValueError, TypeError):
        return None
    return rec if isinstance(rec, dict) else None


class _ErrorList:
    """The `skips` a ShardReader reports to: here each unreadable part of shard `url` becomes a note."""

    def __init__(self, errors: list[str], url: str):
        self.errors, self.url = errors, url

    def handler(self, exn: Exception, n: int = 1) -> bool:  # n: samples lost (ShardReader); the note says it
        self.errors.append(f"{self.url}: {exn}")
        return True


def from_shards(shards: str, max_samples: Optional[int] = None) -> Expected:
    """The expected set of a shard spec (see the module docstring)."""
    urls = expand_shards(shards)
    sizes = shard_sizes(urls, count_missing=True)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    limit = None if max_samples is None else max(0, int(max_samples))
    exp = Expected(subset=limit)
    manifest = _manifests(urls)
    errors: list[str] = []
    dups: list[str] = []
    seen_per_shard = [0] * len(urls)
    for u_i, (u, off) in enumerate(zip(urls, offsets)):
        reader = ShardReader(_ErrorList(errors, u))  # retried like training reads, then given up and noted
        for pos, raw in positioned_samples(reader, [u], [off], limit):
            seen_per_shard[u_i] += 1
            key = raw.get("__key__", f"{os.path.basename(u)}#{pos - off}")
            rec = _read_json(raw)
            if rec is None:
                exp.unknown.append((pos, f"bad_json: {os.path.basename(u)} sample {key!r}: unreadable json",
                                    _flags(manifest, u, pos - off, sizes[u_i])))
                continue
            qid = str(rec.get("question_id", key))
            if qid in exp.records:  # scored once, as the predictions are
                dups.append(qid)
                continue
            exp.records[qid] = dict(rec, question_id=qid)
            exp.key_to_qid[key] = qid
    end = sum(sizes) if limit is None else min(limit, sum(sizes))
    for u, off, n, seen in zip(urls, offsets, sizes, seen_per_shard):
        for p in range(off + seen, min(off + n, end)):
            fl = _flags(manifest, u, p - off, n)
            q = f" ({fl['question_id']})" if fl else ""
            exp.unknown.append((p, f"unreadable: {os.path.basename(u)} holds {seen} readable samples, sizes.json "
                                   f"declares {n} (truncated or corrupt shard){q}", fl))
    if limit is None:  # a subset is defined by positions of the shards given; absent shards are outside it
        manifest.update(_manifests([p for p, _ in _sibling_shards(shards, urls)]))
        for path, n in _sibling_shards(shards, urls):
            for j in range(n):
                fl = _flags(manifest, path, j, n)
                q = f" ({fl['question_id']})" if fl else ""
                exp.unknown.append((-1, f"missing shard: {os.path.basename(path)} is listed in sizes.json "
                                        f"({n} samples) but not found{q}", fl))
    if dups:
        exp.notes.append(f"{len(dups)} samples repeat a question_id and are scored once (e.g. {dups[0]!r})")
    if errors:
        exp.notes.append(f"tar read errors: {'; '.join(errors[:3])}" + (" ..." if len(errors) > 3 else ""))
    return exp


def from_annotations(path: str, shards_exp: Expected) -> Expected:
    """The annotation file's questions (all, or those at the shard subset's positions) as the expected set."""
    from .metrics import _as_dict, load_dataset_file

    ann = _as_dict(load_dataset_file(path))
    exp = Expected(source=f"annotations {path}", subset=shards_exp.subset, key_to_qid=dict(shards_exp.key_to_qid),
                   notes=list(shards_exp.notes))
    if shards_exp.subset is None:
        ids = list(ann)
    else:  # the subset's questions that the annotation file has; unknown positions stay unknown
        ids = [q for q in shards_exp.records if q in ann]
        exp.unknown = list(shards_exp.unknown)
    for q in ids:
        exp.records[q] = dict(ann[q], question_id=q)
        if q not in shards_exp.records:
            exp.missing_reason[q] = "not in the shards: truncated or missing shard, or never sharded"
    extra = [q for q in shards_exp.records if q not in ann]
    if extra:
        exp.notes.append(f"{len(extra)} shard samples are not in {path} and are not scored (e.g. {extra[0]!r})")
    return exp


def expected_set(shards: str, max_samples: Optional[int] = None, annotations: Optional[str] = None) -> Expected:
    exp = from_shards(shards, max_samples)
    return exp if not annotations else from_annotations(annotations, exp)
