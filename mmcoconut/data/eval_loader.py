"""EvalLoader: every sample once, split across ranks by sample position, padded so all ranks yield as many batches.

A sample's position is its shard's offset (the sizes.json counts of the shards before it) + its index in the
shard, so a truncated or corrupt shard never shifts later samples into or out of a `max_samples` subset
(mmcoconut.eval.expected assigns the same positions). Samples that are read but cannot be built (overlong,
corrupt json/image) are reported in the batch that would have held them: `skipped` = [(key, reason)].
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, Optional

import torch
from webdataset import WebLoader

from .collate import Collator, GenerationCollator
from .curriculum import IGNORE, build_example, build_prompt
from .pipeline import RowBuilder, SkipCounter, _worker, ignore_stop_signals
from .shardlist import ShardReader, expand_shards, shard_sizes

log = logging.getLogger(__name__)


def positioned_samples(reader: ShardReader, urls: list[str], offsets: list[int],
                       limit: Optional[int] = None) -> Iterator[tuple[int, dict]]:
    """(position, raw tar sample) in shard order; position = offsets[shard] + index within the shard.
    Positions >= `limit` are not read. Shards are read by `reader` (retried, then skipped and counted)."""
    for u, off in zip(urls, offsets):
        if limit is not None and off >= limit:
            continue
        for j, raw in enumerate(reader.shard(u)):
            if limit is not None and off + j >= limit:
                break
            yield off + j, raw


class _EvalStream(torch.utils.data.IterableDataset):
    """Global sample i goes to rank i % world; rank-local j = i // world fills batch j // bs of that rank;
    physical worker p builds batches p, p+W, ... (all read the tars, only their own samples are decoded)."""

    def __init__(self, L: "EvalLoader"):
        self.L = L

    def _row(self, raw: dict) -> Optional[dict]:
        L = self.L
        if L.with_labels:
            return L.rows.build(raw, build_example, view=L.view, stage=L.stage, cur=L.cur, rng=None,
                                n_latents=L.n_latents)
        return L.rows.build(raw, build_prompt, view=L.view, stage=L.stage, cur=L.cur, n_latents=L.n_latents)

    def _template(self) -> dict:
        for _, raw in positioned_samples(self.L.reader, self.L.urls, self.L.offsets):
            row = self._row(raw)
            if row is not None:
                return dict(row, valid=False)
        raise RuntimeError(f"{self.L.urls[0]}...: no valid sample to pad eval batches with")

    def _flush(self, rows: list[dict], tmpl: list, skipped: list) -> dict:
        if len(rows) < self.L.batch_size and not tmpl:
            tmpl.append(self._template())
        rows = rows + [tmpl[0]] * (self.L.batch_size - len(rows))
        return dict(self.L.collator(rows), skipped=skipped)

    def __iter__(self):
        L = self.L
        p, W = _worker()
        mine = list(range(p, L.num_batches, W))
        if not mine:
            return
        rows, skipped, cur, tmpl, k = [], [], mine[0], [], 0
        for i, raw in positioned_samples(L.reader, L.urls, L.offsets, limit=L.total):
            if i % L.world_size != L.rank:
                continue
            b = (i // L.world_size) // L.batch_size
            if b % W != p:
                continue
            while b > cur:  # finished batch `cur` (possibly short after skips)
                yield self._flush(rows, tmpl, skipped)
                rows, skipped, k = [], [], k + 1
                cur = mine[k]
            row = self._row(raw)
            if row is not None:
                rows.append(dict(row, valid=True))
                if not tmpl:
                    tmpl.append(dict(row, valid=False))
            else:
                skipped.append((raw.get("__key__", "?"), L.skips.last))
        for _ in range(k, len(mine)):  # the rest of this worker's batches, padded with valid=False rows
            yield self._flush(rows, tmpl, skipped)
            rows, skipped = [], []


class _WithMeta:
    """Collator + meta/valid (val-loss batches); padding rows (valid=False) get no labels, so the model's loss
    leaves them out. A class, not a lambda, so it pickles for spawned workers."""

    def __init__(self, base: Collator):
        self.base = base

    def __call__(self, rows: list[dict]) -> dict:
        rows = [r if r["valid"] else dict(r, labels=[IGNORE] * len(r["labels"])) for r in rows]
        return dict(self.base(rows), meta=[r["meta"] for r in rows], valid=[bool(r["valid"]) for r in rows])


class EvalLoader:
    """Every sample once, no shuffle; the same number of batches on every rank (padding rows: valid=False).

    Prompts (GenerationCollator) by default; with_labels=True gives full sequences (Collator) for val loss.
    n_latents=None: per-sample upstream count for `stage` (default curriculum.max_latent_stage).
    """

    def __init__(self, shards: str, tokenizer, image_processor, cfg, *, view: str, n_latents: Optional[int],
                 batch_size: int, rank: int, world_size: int, n_image_tokens: int, max_samples: Optional[int] = None,
                 stage: Optional[int] = None, with_labels: bool = False):
        d = cfg.data
        self.urls = expand_shards(shards, timeout=d.shard_timeout)
        self.view, self.n_latents, self.batch_size, self.with_labels = view, n_latents, batch_size, with_labels
        self.rank, self.world_size, self.cur = rank, world_size, cfg.curriculum
        self.stage = cfg.curriculum.max_latent_stage if stage is None else stage
        sizes = shard_sizes(self.urls, count_missing=True, timeout=d.shard_timeout)
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        total = sum(sizes)
        self.total = total if max_samples is None else min(total, max_samples)
        self.num_batches = math.ceil(math.ceil(self.total / world_size) / batch_size)
        self.num_workers = min(cfg.data.num_workers, self.num_batches)
        self.skips = SkipCounter()
        self.reader = ShardReader.from_config(d, self.skips, dict(zip(self.urls, sizes)))
        self.rows = RowBuilder(tokenizer, image_processor, cfg, n_image_tokens, self.skips)
        ids = self.rows.ids
        self.collator = (Collator if with_labels else GenerationCollator)(ids, ids.pad)
        if with_labels:
            self.collator = _WithMeta(self.collator)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def skipped(self) -> int:
        return self.skips.total

    def __iter__(self) -> Iterator[dict]:
        if self.num_batches == 0:
            return iter(())
        return iter(WebLoader(_EvalStream(self), batch_size=None, num_workers=self.num_workers,
                              persistent_workers=False,
                              worker_init_fn=ignore_stop_signals if self.num_workers else None))
