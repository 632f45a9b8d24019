"""WebDataset loaders: StreamingLoader (training, exact resume) and EvalLoader (every sample once, padded).

Training stream of one rank, per logical worker w of W = max(1, num_workers) (open_clip's get_wds_dataset):
  shards shuffled by (seed, epoch) -> rank slice [rank::world] -> worker slice [w::W] -> cycled (reshuffled each
  pass, so a rank with fewer samples never runs dry) | or resampled with replacement per (seed, epoch, rank, w)
  -> tar samples -> shuffle buffer seeded (seed, epoch, rank, w) -> json + tokens (build_example) -> image
  (PIL, JPEG draft) -> CLIP processor -> batches of micro_batch_size (Collator) in the worker.
Worker w yields batches w, w+W, ... of the rank's `len(loader)`; the DataLoader's round robin interleaves them
in order. Resume: a rebuilt stream skips the consumed part without decoding images, and worker ids are rotated
by `batches_consumed % W` so the next batch still comes first. Shards come from shardlist.ShardReader (local,
http(s), pipe:, fsspec; retried, then skipped and counted); the shards given up on are part of the state and
are replayed on resume, so the continuation is exact even when the shard is readable again. A resumed stream
re-reads (for remote shards: re-downloads) this worker's part of the epoch up to the position.
"""
from __future__ import annotations

import itertools
import logging
import random
from typing import Iterable, Iterator, Optional

import torch
from webdataset import WebLoader
from webdataset.filters import shuffle as wds_shuffle

from .collate import Collator
from .curriculum import SharedStage, build_example, sample_rng
from .pipeline import MAX_CONSECUTIVE_FAILURES, SKIP_REASONS, RowBuilder, SkipCounter, _worker, ignore_stop_signals
from .shardlist import ShardReader, expand_shards, shard_sizes

log = logging.getLogger(__name__)


class _TrainStream(torch.utils.data.IterableDataset):
    def __init__(self, L: "StreamingLoader", start: int, skip_raw: list[Optional[int]], replay: list[dict]):
        self.L, self.start, self.skip_raw, self.replay = L, start, skip_raw, replay

    def _passes(self, w: int) -> Iterator[Iterable[str]]:
        """This worker's shards, one list per pass (resampled: one endless pass)."""
        L, tag = self.L, f"{self.L.seed}:{self.L.epoch}"
        if L.resampled:  # with replacement, seeded per (seed, epoch, rank, worker); no node split needed
            rng = random.Random(f"{tag}:{L.rank}:{w}:resample")
            yield (rng.choice(L.urls) for _ in itertools.count())
            return
        order = list(L.urls)
        random.Random(f"{tag}:shards").shuffle(order)  # identical on every rank, so slices are disjoint
        mine = order[L.rank::L.world_size][w::L.W]
        rng = random.Random(f"{tag}:{L.rank}:{w}:cycle")
        while True:  # cycle: uneven shards must not leave this rank short of batches
            yield list(mine)
            rng.shuffle(mine)

    def _tars(self, urls: Iterable[str], p: int, failures: dict) -> Iterator[dict]:
        """Raw samples of pass p's shards. A shard given up on after its retries is recorded in `failures` as
        (pass, index) -> samples read; a resumed stream replays such a record (reads that many, then moves on)
        so that it repeats the interrupted run's samples even when the shard is readable again."""
        for i, u in enumerate(urls):
            stopped = yield from self.L.reader.shard(u, limit=failures.get((p, i)))
            if stopped is not None:
                failures[(p, i)] = stopped

    def _samples(self, w: int, failures: dict) -> Iterator[dict]:
        """Raw samples, shuffled per pass: the buffer drains at each pass end, so when sizes divide evenly an
        epoch reads every sample exactly once."""
        L, empty = self.L, 0
        rng = random.Random(f"{L.seed}:{L.epoch}:{L.rank}:{w}:samples")
        for p, urls in enumerate(self._passes(w)):
            stream, got = self._tars(urls, p, failures), 0
            if L.shuffle_buffer > 1:
                stream = wds_shuffle(L.shuffle_buffer, initial=L.shuffle_buffer, rng=rng)(stream)
            for raw in stream:
                got += 1
                yield raw
            empty = 0 if got else empty + 1
            if empty > 3:
                raise RuntimeError(f"rank {L.rank} worker {w}: its shards yield no samples (see warnings)")

    def __iter__(self):
        L = self.L
        p, n_phys = _worker()
        w = (p + self.start) % L.W  # rotate so that the next batch (index `start`) comes from physical worker 0
        todo = range(w, L.num_batches, L.W)
        done = sum(1 for i in todo if i < self.start)
        remaining = len(todo) - done
        if remaining <= 0:
            return
        failures = dict(self.replay[w])
        stream = self._samples(w, failures)
        stage = L.stage.get()
        skip_raw = self.skip_raw[w]  # None: position unknown (other rank's state) -> skip rows cheaply
        skip_rows = done * L.micro if skip_raw is None else 0
        rows, pos, fails = [], 0, 0
        discard_skips = self.start > 0  # skips met while re-reading the consumed part were counted before
        for raw in stream:
            pos += 1
            if skip_raw is not None and pos <= skip_raw:
                continue  # exact: these raw samples were consumed before the checkpoint
            decode = skip_rows <= 0
            if decode and discard_skips:
                L.skips.take()
                discard_skips = False
            rng = sample_rng(L.seed, L.epoch, raw.get("__key__", ""))
            row = L.rows.build(raw, build_example, decode=decode, view="train", stage=stage, cur=L.cur, rng=rng)
            if row is None:
                fails += 1
                if fails > MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(f"rank {L.rank} worker {w}: {fails} samples in a row failed, the last: "
                                       f"{L.skips.last}")
                continue
            fails = 0
            if not decode:  # resume without positions: skip rows by the cheap (text + header) check
                skip_rows -= 1
                continue
            rows.append(row)
            if len(rows) == L.micro:
                batch = L.collator(rows)
                batch["_pos"] = (w, pos, [[p, i, n] for (p, i), n in sorted(failures.items())])
                batch["_skips"] = L.skips.take()  # skips since the previous batch
                rows = []
                yield batch
                remaining -= 1
                if remaining == 0:
                    return


def batches_per_rank(spec: str, samples_per_epoch: int, world_size: int, micro_batch_size: int) -> int:
    """Micro-batches per rank per epoch (identical on every rank); ValueError when not even one."""
    n = samples_per_epoch // (world_size * micro_batch_size)
    if n == 0:
        raise ValueError(f"{spec!r}: {samples_per_epoch} samples per epoch < world_size {world_size} x "
                         f"micro_batch_size {micro_batch_size}: not one batch per rank")
    return n


def check_worker_shards(spec: str, n_shards: int, world_size: int, num_workers: int, resampled: bool) -> None:
    """Without resampling every (rank, worker) reads its own shards: ValueError when there are too few (the
    trainer's pre-flight lowers data.num_workers first, so there it means fewer shards than ranks)."""
    workers = max(1, num_workers)
    if not resampled and n_shards < world_size * workers:
        raise ValueError(f"{spec!r}: {n_shards} shard(s) for {world_size} ranks x {workers} workers; every "
                         f"worker needs a shard. Write more, smaller shards (mmcoconut-shard --maxcount), use "
                         f"fewer data.num_workers, or data.resampled=true")


def _sizes_if_known(urls: list[str], data_cfg) -> Optional[list[int]]:
    """sizes.json counts when data.samples_per_epoch makes them optional (a lost shard then counts as its samples)."""
    try:
        return shard_sizes(urls, timeout=data_cfg.shard_timeout, retries=0)
    except (OSError, ValueError):
        return None


class StreamingLoader:
    """Training batches for one rank; `len()` is identical on every rank. See module docstring."""

    def __init__(self, shards: str, tokenizer, image_processor, cfg, *, rank: int, world_size: int,
                 micro_batch_size: int, n_image_tokens: int, seed: int):
        d = cfg.data
        self.urls = expand_shards(shards, timeout=d.shard_timeout)
        self.spec, self.rank, self.world_size, self.micro, self.seed = shards, rank, world_size, micro_batch_size, seed
        self.cur, self.resampled, self.shuffle_buffer = cfg.curriculum, d.resampled, d.shuffle_buffer
        self.num_workers = d.num_workers
        self.W = max(1, d.num_workers)
        sizes = _sizes_if_known(self.urls, d) if d.samples_per_epoch else \
            shard_sizes(self.urls, timeout=d.shard_timeout)
        self.samples_per_epoch = d.samples_per_epoch or sum(sizes)
        self.num_batches = batches_per_rank(shards, self.samples_per_epoch, world_size, micro_batch_size)
        check_worker_shards(shards, len(self.urls), world_size, d.num_workers, self.resampled)
        self.skips = SkipCounter()
        self.reader = ShardReader.from_config(d, self.skips, dict(zip(self.urls, sizes)) if sizes else None)
        self.rows = RowBuilder(tokenizer, image_processor, cfg, n_image_tokens, self.skips)
        ids = self.rows.ids
        self.collator = Collator(ids, ids.pad)
        self.stage = SharedStage(0)
        self.epoch, self.consumed = 0, 0
        self._positions: list[Optional[int]] = [0] * self.W  # raw samples read per logical worker
        self.skip_counts = dict.fromkeys(SKIP_REASONS, 0)  # samples skipped (per reason) in consumed batches
        self.pin_memory = False  # pin batches (DataLoader thread) for non_blocking host->GPU copies
        self._failures: list[list] = [[] for _ in range(self.W)]  # per logical worker: [pass, index, read]

    def __len__(self) -> int:
        return self.num_batches

    @property
    def skipped(self) -> int:
        return self.skips.total

    def set_epoch(self, epoch: int) -> None:
        """A new epoch restarts the count; the current one (e.g. after load_state_dict) is kept."""
        if epoch != self.epoch:
            self.epoch, self.consumed, self._positions = epoch, 0, [0] * self.W
            self._failures = [[] for _ in range(self.W)]

    def set_stage(self, stage: int) -> None:
        self.stage.set(stage)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "stage": self.stage.get(), "batches_consumed": self.consumed,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "num_workers": self.W,
                "positions": list(self._positions), "skips": dict(self.skip_counts),
                "shard_failures": [list(f) for f in self._failures]}

    def load_state_dict(self, sd: dict) -> None:
        """Continue at sd's next batch. Raw-sample positions are used when sd is this rank's (exact even over
        corrupt samples); otherwise the consumed rows are skipped by a cheap text + image-header check."""
        if (sd.get("num_workers"), sd.get("world_size")) not in ((self.W, self.world_size), (None, None)):
            log.warning("resuming with num_workers/world_size %s/%s instead of %s/%s: the sample order differs",
                        self.W, self.world_size, sd.get("num_workers"), sd.get("world_size"))
        self.seed, self.epoch, self.consumed = int(sd["seed"]), int(sd["epoch"]), int(sd["batches_consumed"])
        self.set_stage(int(sd["stage"]))
        same = sd.get("rank") == self.rank and sd.get("num_workers") == self.W and sd.get("positions")
        self._positions = list(sd["positions"]) if same else [None] * self.W
        self.skip_counts = {r: int((sd.get("skips") or {}).get(r, 0)) for r in SKIP_REASONS}
        self._failures = [list(f) for f in sd.get("shard_failures") or [[]] * self.W] if same else \
            [[] for _ in range(self.W)]

    def __iter__(self) -> Iterator[dict]:
        if self.consumed >= self.num_batches:
            log.info("epoch %d already consumed (%d batches); call set_epoch(epoch + 1)", self.epoch, self.consumed)
            return
        replay = [{(p, i): n for p, i, n in f} for f in self._failures]
        stream = _TrainStream(self, self.consumed, list(self._positions), replay)
        loader = WebLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                           worker_init_fn=ignore_stop_signals if self.num_workers else None,
                           pin_memory=self.pin_memory)
        for batch in loader:
            w, pos, self._failures[w] = batch.pop("_pos")
            self._positions[w], self.consumed = pos, self.consumed + 1
            for reason, n in batch.pop("_skips").items():
                self.skip_counts[reason] += int(n)
            yield batch
            if self.consumed >= self.num_batches:
                break


# ---------------------------------------------------------------- evaluation


