"""Shared pieces of the loaders: shard lists and sizes (in shardlist.py), skip counting, images, row building."""
from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..tokens import SpecialIds
from .curriculum import OverlongError
from .shardlist import ShardReader, expand_shards, shard_sizes  # noqa: F401  (re-exported: shard specs and sizes)

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_FAILURES = 1000  # a stream that only fails is an error, never a silent spin


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

    @property
    def total(self) -> int:
        return self.corrupt.value + self.overlong.value


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
