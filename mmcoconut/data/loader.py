"""WebDataset loaders: StreamingLoader (training, exact resume) and EvalLoader (every sample once, padded).

Training stream of one rank, per logical worker w of W = max(1, num_workers) (open_clip's get_wds_dataset):
  shards shuffled by (seed, epoch) -> rank slice [rank::world] -> worker slice [w::W] -> cycled (reshuffled each
  pass, so a rank with fewer samples never runs dry) | or resampled with replacement per (seed, epoch, rank, w)
  -> tar samples -> shuffle buffer seeded (seed, epoch, rank, w) -> json + tokens (build_example) -> image
  (PIL, JPEG draft) -> CLIP processor -> batches of micro_batch_size (Collator) in the worker.
Worker w yields batches w, w+W, ... of the rank's `len(loader)`; the DataLoader's round robin interleaves them
in order. Resume: a rebuilt stream skips the consumed part without decoding images, and worker ids are rotated
by `batches_consumed % W` so the next batch still comes first.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import random
from typing import Iterable, Iterator, Optional

import braceexpand
import numpy as np
import torch
from PIL import Image
from webdataset import WebLoader
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import tarfile_samples

from ..tokens import SpecialIds
from .collate import Collator, GenerationCollator
from .curriculum import OverlongError, SharedStage, build_example, build_prompt, sample_rng

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_FAILURES = 1000  # a stream that only fails is an error, never a silent spin


# ---------------------------------------------------------------- shard specs and sizes
def expand_shards(spec: str) -> list[str]:
    """Directory (all *.tar), 'dir/train' (-> dir/train-*.tar), brace pattern, or '::'-joined list of those."""
    if not spec:
        raise FileNotFoundError("no shards given (data.train_shards / data.val_shards is empty)")
    urls: list[str] = []
    for part in spec.split("::"):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
        elif os.path.isfile(part):
            found = [part]
        elif "{" in part:
            found = list(braceexpand.braceexpand(part))
            missing = [u for u in found if not os.path.isfile(u)]
            if missing:
                raise FileNotFoundError(f"shard spec {spec!r}: {len(missing)} missing, e.g. {missing[0]}")
        else:
            found = sorted(glob.glob(part + "-*.tar")) or sorted(glob.glob(part))
        if not found:
            raise FileNotFoundError(f"shard spec {spec!r}: no .tar files match {part!r} "
                                    "(give a directory, dir/<split>, a brace pattern or a '::' list)")
        urls += found
    return urls


def shard_sizes(urls: list[str], count_missing: bool = False) -> list[int]:
    """Samples per shard from sizes.json next to each shard ({basename: count}, open_clip convention)."""
    cache: dict[str, dict] = {}
    out = []
    for u in urls:
        path = os.path.join(os.path.dirname(u), "sizes.json")
        if path not in cache:
            cache[path] = json.load(open(path)) if os.path.isfile(path) else {}
        n = cache[path].get(os.path.basename(u))
        if n is None and count_missing:  # eval: count distinct keys (cheap, headers only)
            import tarfile
            with tarfile.open(u) as tf:
                n = len({m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile()})
        if n is None:
            raise FileNotFoundError(f"no sample count for shard {u}: {path} is missing or lacks "
                                    f"{os.path.basename(u)!r}; set data.samples_per_epoch or write sizes.json")
        out.append(int(n))
    return out


# ---------------------------------------------------------------- skip accounting
class SkipCounter:
    """Counts skipped samples across workers (shared memory) and warns with shard URL and key."""

    def __init__(self):
        self.corrupt, self.overlong = mp.Value("i", 0), mp.Value("i", 0)

    def _bump(self, which, msg: str) -> None:
        with which.get_lock():
            which.value += 1
            n = which.value
        if n <= 20 or n % 100 == 0:
            log.warning("%s (skipped so far: %d)", msg, n)

    def bad_sample(self, raw: dict, exn: Exception) -> None:
        self._bump(self.corrupt, f"skipping corrupt sample {raw.get('__key__')!r} of {raw.get('__url__')}: "
                                 f"{type(exn).__name__}: {exn}")

    def long_sample(self, exn: Exception) -> None:
        self._bump(self.overlong, f"skipping overlong sample: {exn}")

    def handler(self, exn: Exception) -> bool:  # tar-level errors (unreadable / truncated shard)
        self._bump(self.corrupt, f"skipping unreadable shard data: {type(exn).__name__}: {exn}")
        return True

    def as_dict(self) -> dict:
        return {"corrupt": self.corrupt.value, "overlong": self.overlong.value}


# ---------------------------------------------------------------- sample -> row
def _field(proc, attr: str, key: str):
    d = getattr(proc, attr, None)  # a dict or a transformers SizeDict
    try:
        return d[key]
    except (KeyError, TypeError):
        return getattr(d, key, None)


class FastClipPreprocess:
    """CLIPImageProcessor's resize (shortest edge) -> center crop -> rescale -> normalize, as PIL + one torch op.

    ~2x faster than the processor's generic path (bench/RESULTS.md). `build` returns None unless the processor
    has exactly these settings and the fast path reproduces its output on test images (max |diff| < 1e-4).
    """

    def __init__(self, proc):
        self.short, self.resample = _field(proc, "size", "shortest_edge"), proc.resample
        self.crop = (_field(proc, "crop_size", "height"), _field(proc, "crop_size", "width"))
        std = np.asarray(proc.image_std, dtype=np.float32).reshape(3, 1, 1)  # y = x * mul + add, in numpy:
        self.mul = np.float32(proc.rescale_factor) / std  # torch's elementwise ops are slower per small image
        self.add = -np.asarray(proc.image_mean, dtype=np.float32).reshape(3, 1, 1) / std

    @classmethod
    def build(cls, proc) -> Optional["FastClipPreprocess"]:
        try:
            if not (type(proc).__name__.startswith("CLIPImageProcessor") and proc.do_resize and proc.do_center_crop
                    and proc.do_rescale and proc.do_normalize and isinstance(_field(proc, "size", "shortest_edge"), int)
                    and all(isinstance(_field(proc, "crop_size", k), int) for k in ("height", "width"))):
                return None
            fast, g = cls(proc), torch.Generator().manual_seed(0)
            for w, h in ((50, 37), (37, 61)):
                img = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
                ref = proc(images=img, return_tensors="pt")["pixel_values"][0]
                if ref.shape != fast(img).shape or (ref - fast(img)).abs().max() > 1e-4:
                    return None
            return fast
        except Exception:  # unexpected processor layout: use the processor itself
            return None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        s = self.short
        nw, nh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), resample=self.resample)
        ch, cw = self.crop
        top, left = (nh - ch) // 2, (nw - cw) // 2
        if (top, left, ch, cw) != (0, 0, nh, nw):
            img = img.crop((left, top, left + cw, top + ch))
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        y = np.empty(x.shape, dtype=np.float32)
        np.multiply(x, self.mul, out=y)
        y += self.add
        return torch.from_numpy(y)


class RowBuilder:
    """Raw tar sample -> row dict for the collators. Text first, so overlong samples skip image decode."""

    def __init__(self, tokenizer, image_processor, cfg, n_image_tokens: int, skips: SkipCounter):
        self.tok, self.proc, self.cfg, self.n_img, self.skips = tokenizer, image_processor, cfg, n_image_tokens, skips
        self.ids = SpecialIds.from_tokenizer(tokenizer)
        self.fast = FastClipPreprocess.build(image_processor)
        sizes = [_field(image_processor, d, k) for d in ("size", "crop_size")
                 for k in ("shortest_edge", "height", "width")]
        self.draft = max((v for v in sizes if isinstance(v, int)), default=None)

    @staticmethod
    def parse(raw: dict) -> dict:
        if "json" not in raw:
            raise KeyError("no .json member")
        sample = json.loads(raw["json"])
        if not isinstance(sample, dict) or "question" not in sample:
            raise ValueError("json is not an object with a 'question'")
        return sample

    def image(self, raw: dict, decode: bool = True):
        data = raw.get("jpg", raw.get("jpeg", raw.get("png")))
        if data is None:
            raise KeyError("no .jpg member")
        img = Image.open(io.BytesIO(data))
        if not decode:
            return None  # header parsed: cheap validity check used when skipping for resume
        if self.draft and img.format == "JPEG":
            img.draft("RGB", (self.draft, self.draft))  # DCT downscale-on-decode, result still >= target size
        img = img.convert("RGB")
        if self.fast is not None:
            return self.fast(img)
        return self.proc(images=img, return_tensors="pt")["pixel_values"][0]

    def build(self, raw: dict, fn, decode: bool = True, **kw) -> Optional[dict]:
        """fn = build_example | build_prompt; None when the sample is skipped (counted)."""
        key = raw.get("__key__", "?")
        try:
            sample = self.parse(raw)
            row = fn(sample, self.tok, self.ids, n_image_tokens=self.n_img, max_length=self.cfg.model.max_length,
                     key=key, **kw)
            row["pixel_values"] = self.image(raw, decode)
        except OverlongError as e:
            if self.cfg.data.overlong == "error":
                raise
            self.skips.long_sample(e)
            return None
        except Exception as e:  # corrupt image / bad json / missing member
            self.skips.bad_sample(raw, e)
            return None
        sample.pop("_tok", None)
        row.update(key=key, meta=sample)
        return row


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _read(urls: list[str], skips: SkipCounter) -> Iterator[dict]:
    for u in urls:
        yield from tarfile_samples([{"url": u}], handler=skips.handler)


# ---------------------------------------------------------------- training
class _TrainStream(torch.utils.data.IterableDataset):
    def __init__(self, L: "StreamingLoader", start: int, skip_raw: list[Optional[int]]):
        self.L, self.start, self.skip_raw = L, start, skip_raw

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

    def _samples(self, w: int) -> Iterator[dict]:
        """Raw samples, shuffled per pass: the buffer drains at each pass end, so when sizes divide evenly an
        epoch reads every sample exactly once."""
        L, empty = self.L, 0
        rng = random.Random(f"{L.seed}:{L.epoch}:{L.rank}:{w}:samples")
        for urls in self._passes(w):
            stream, got = _read(urls, L.skips), 0
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
        stream = self._samples(w)
        stage = L.stage.get()
        skip_raw = self.skip_raw[w]  # None: position unknown (other rank's state) -> skip rows cheaply
        skip_rows = done * L.micro if skip_raw is None else 0
        rows, pos, fails = [], 0, 0
        for raw in stream:
            pos += 1
            if skip_raw is not None and pos <= skip_raw:
                continue  # exact: these raw samples were consumed before the checkpoint
            decode = skip_rows <= 0
            rng = sample_rng(L.seed, L.epoch, raw.get("__key__", ""))
            row = L.rows.build(raw, build_example, decode=decode, view="train", stage=stage, cur=L.cur, rng=rng)
            if row is None:
                fails += 1
                if fails > MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(f"rank {L.rank} worker {w}: {fails} samples in a row failed; see warnings")
                continue
            fails = 0
            if not decode:  # resume without positions: skip rows by the cheap (text + header) check
                skip_rows -= 1
                continue
            rows.append(row)
            if len(rows) == L.micro:
                batch = L.collator(rows)
                batch["_pos"] = (w, pos)
                rows = []
                yield batch
                remaining -= 1
                if remaining == 0:
                    return


class StreamingLoader:
    """Training batches for one rank; `len()` is identical on every rank. See module docstring."""

    def __init__(self, shards: str, tokenizer, image_processor, cfg, *, rank: int, world_size: int,
                 micro_batch_size: int, n_image_tokens: int, seed: int):
        d = cfg.data
        self.urls = expand_shards(shards)
        self.spec, self.rank, self.world_size, self.micro, self.seed = shards, rank, world_size, micro_batch_size, seed
        self.cur, self.resampled, self.shuffle_buffer = cfg.curriculum, d.resampled, d.shuffle_buffer
        self.num_workers = d.num_workers
        self.W = max(1, d.num_workers)
        self.samples_per_epoch = d.samples_per_epoch or sum(shard_sizes(self.urls))
        self.num_batches = self.samples_per_epoch // (world_size * micro_batch_size)
        if self.num_batches == 0:
            raise ValueError(f"{shards!r}: {self.samples_per_epoch} samples per epoch < world_size {world_size} x "
                             f"micro_batch_size {micro_batch_size}: not one batch per rank")
        if not self.resampled and len(self.urls) < world_size * self.W:
            raise ValueError(f"{shards!r}: {len(self.urls)} shards for {world_size} ranks x {self.W} workers; every "
                             f"worker needs a shard. Write more, smaller shards (make_shards --maxcount), use "
                             f"fewer data.num_workers, or data.resampled=true")
        self.skips = SkipCounter()
        self.rows = RowBuilder(tokenizer, image_processor, cfg, n_image_tokens, self.skips)
        ids = self.rows.ids
        self.collator = Collator(ids, ids.pad)
        self.stage = SharedStage(0)
        self.epoch, self.consumed = 0, 0
        self._positions: list[Optional[int]] = [0] * self.W  # raw samples read per logical worker

    def __len__(self) -> int:
        return self.num_batches

    @property
    def skipped(self) -> int:
        c = self.skips.as_dict()
        return c["corrupt"] + c["overlong"]

    def set_epoch(self, epoch: int) -> None:
        """A new epoch restarts the count; the current one (e.g. after load_state_dict) is kept."""
        if epoch != self.epoch:
            self.epoch, self.consumed, self._positions = epoch, 0, [0] * self.W

    def set_stage(self, stage: int) -> None:
        self.stage.set(stage)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "stage": self.stage.get(), "batches_consumed": self.consumed,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "num_workers": self.W,
                "positions": list(self._positions)}

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

    def __iter__(self) -> Iterator[dict]:
        if self.consumed >= self.num_batches:
            log.info("epoch %d already consumed (%d batches); call set_epoch(epoch + 1)", self.epoch, self.consumed)
            return
        stream = _TrainStream(self, self.consumed, list(self._positions))
        loader = WebLoader(stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False)
        for batch in loader:
            w, pos = batch.pop("_pos")
            self._positions[w], self.consumed = pos, self.consumed + 1
            yield batch
            if self.consumed >= self.num_batches:
                break


# ---------------------------------------------------------------- evaluation
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
        for raw in _read(self.L.urls, self.L.skips):
            row = self._row(raw)
            if row is not None:
                return dict(row, valid=False)
        raise RuntimeError(f"{self.L.urls[0]}...: no valid sample to pad eval batches with")

    def _flush(self, rows: list[dict], tmpl: list) -> dict:
        if len(rows) < self.L.batch_size and not tmpl:
            tmpl.append(self._template())
        rows = rows + [tmpl[0]] * (self.L.batch_size - len(rows))
        return self.L.collator(rows)

    def __iter__(self):
        L = self.L
        p, W = _worker()
        mine = list(range(p, L.num_batches, W))
        if not mine:
            return
        rows, cur, tmpl, k = [], mine[0], [], 0
        for i, raw in enumerate(_read(L.urls, L.skips)):
            if i >= L.total:
                break
            if i % L.world_size != L.rank:
                continue
            b = (i // L.world_size) // L.batch_size
            if b % W != p:
                continue
            while b > cur:  # finished batch `cur` (possibly short after skips)
                yield self._flush(rows, tmpl)
                rows, k = [], k + 1
                cur = mine[k]
            row = self._row(raw)
            if row is not None:
                rows.append(dict(row, valid=True))
                if not tmpl:
                    tmpl.append(dict(row, valid=False))
        for _ in range(k, len(mine)):  # the rest of this worker's batches, padded with valid=False rows
            yield self._flush(rows, tmpl)
            rows = []


class _WithMeta:
    """Collator + meta/valid (val-loss batches); a class, not a lambda, so it pickles for spawned workers."""

    def __init__(self, base: Collator):
        self.base = base

    def __call__(self, rows: list[dict]) -> dict:
        return dict(self.base(rows), meta=[r["meta"] for r in rows], valid=[bool(r["valid"]) for r in rows])


class EvalLoader:
    """Every sample once, no shuffle; the same number of batches on every rank (padding rows: valid=False).

    Prompts (GenerationCollator) by default; with_labels=True gives full sequences (Collator) for val loss.
    n_latents=None: per-sample upstream count for `stage` (default curriculum.max_latent_stage).
    """

    def __init__(self, shards: str, tokenizer, image_processor, cfg, *, view: str, n_latents: Optional[int],
                 batch_size: int, rank: int, world_size: int, n_image_tokens: int, max_samples: Optional[int] = None,
                 stage: Optional[int] = None, with_labels: bool = False):
        self.urls = expand_shards(shards)
        self.view, self.n_latents, self.batch_size, self.with_labels = view, n_latents, batch_size, with_labels
        self.rank, self.world_size, self.cur = rank, world_size, cfg.curriculum
        self.stage = cfg.curriculum.max_latent_stage if stage is None else stage
        total = sum(shard_sizes(self.urls, count_missing=True))
        self.total = total if max_samples is None else min(total, max_samples)
        self.num_batches = math.ceil(math.ceil(self.total / world_size) / batch_size)
        self.num_workers = min(cfg.data.num_workers, self.num_batches)
        self.skips = SkipCounter()
        self.rows = RowBuilder(tokenizer, image_processor, cfg, n_image_tokens, self.skips)
        ids = self.rows.ids
        self.collator = (Collator if with_labels else GenerationCollator)(ids, ids.pad)
        if with_labels:
            self.collator = _WithMeta(self.collator)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def skipped(self) -> int:
        c = self.skips.as_dict()
        return c["corrupt"] + c["overlong"]

    def __iter__(self) -> Iterator[dict]:
        if self.num_batches == 0:
            return iter(())
        return iter(WebLoader(_EvalStream(self), batch_size=None, num_workers=self.num_workers,
                              persistent_workers=False))
