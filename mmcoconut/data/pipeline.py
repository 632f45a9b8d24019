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

from ..modeling.prompt import format_question
from ..modeling.tokens import SpecialIds
from .curriculum import NoStepsError, OverlongError

log = logging.getLogger(__name__)
MAX_CONSECUTIVE_FAILURES = 1000  # a stream that only fails is an error, never a silent spin


# ---------------------------------------------------------------- skip accounting
SKIP_REASONS = ("unreadable_shard", "bad_json", "bad_image", "too_long", "no_steps")


class SkipCounter:
    """Skipped samples per reason (SKIP_REASONS), with a warning naming the shard URL and sample key.

    Two views: shared counters (multiprocessing Values, summed over all workers: `as_dict()`, `total`, used to
    number the warnings and by the eval loaders) and this process's counts since the last `take()`, which the
    training stream attaches to the batch whose rows it skipped, so the loader counts exactly what was consumed
    (also across resume). Any loader code that drops a sample or a shard calls `skip(reason, message, n)`: a shard
    given up on counts as the samples it still held (sizes.json), not as one. `last`: the latest reason + message.
    """

    REASONS = SKIP_REASONS

    def __init__(self):
        self._shared = {r: mp.Value("i", 0) for r in SKIP_REASONS}
        self._pending = dict.fromkeys(SKIP_REASONS, 0)
        self.last = ""

    def skip(self, reason: str, msg: str, n: int = 1) -> None:
        if reason not in self._shared:
            raise ValueError(f"unknown skip reason {reason!r}; one of {SKIP_REASONS}")
        self.last = f"{reason}: {msg}"
        self._pending[reason] += n
        v = self._shared[reason]
        with v.get_lock():
            before = v.value
            v.value += n
            total = v.value
        if before < 20 or total // 100 > before // 100:
            log.warning("skipping %s [%s; %d skipped for this reason so far]", msg, reason, total)

    def bad_sample(self, raw: dict, exn: Exception, reason: str) -> None:
        self.skip(reason, f"sample {raw.get('__key__')!r} of {raw.get('__url__')}: {type(exn).__name__}: {exn}")

    def long_sample(self, exn: Exception) -> None:
        self.skip("too_long", f"overlong sample: {exn}")

    def handler(self, exn: Exception, n: int = 1) -> bool:  # tar-level errors (unreadable shard): keep going
        self.skip("unreadable_shard", f"unreadable shard data: {type(exn).__name__}: {exn}", n)
        return True

    def take(self) -> dict:
        """This process's counts since the last take() ({reason: n}, only non-zero), and reset them."""
        out = {r: n for r, n in self._pending.items() if n}
        self._pending = dict.fromkeys(SKIP_REASONS, 0)
        return out

    def as_dict(self) -> dict:
        return {r: v.value for r, v in self._shared.items()}

    @property
    def total(self) -> int:
        return sum(v.value for v in self._shared.values())


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: workers ignore SIGTERM/SIGINT/SIGUSR1, which launchers and schedulers send to
    every process; the rank finishes its step, checkpoints and then shuts its workers down (mmcoconut.train.signals).
    A worker whose rank died exits on its own (torch's parent watchdog)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    try:
        signal.set_wakeup_fd(-1)  # the rank's wakeup fd is inherited across fork: not this process's to write
    except ValueError:
        pass


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

    def parse(self, raw: dict) -> dict:
        """The shard json, its question in the run's prompt format (data.choices_in_question: the choice list
        added or removed; None: as stored)."""
        if "json" not in raw:
            raise KeyError("no .json member")
        sample = json.loads(raw["json"])
        if not isinstance(sample, dict) or not isinstance(sample.get("question"), str):
            raise ValueError("json is not an object with a 'question' string")
        choices = sample.get("choices")
        if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
            sample["question"] = format_question(sample["question"], choices, self.cfg.data.choices_in_question)
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
        """fn = build_example | build_prompt; None when the sample is skipped (counted under its reason)."""
        key = raw.get("__key__", "?")
        try:
            sample = self.parse(raw)
            row = fn(sample, self.tok, self.ids, n_image_tokens=self.n_img, max_length=self.cfg.model.max_length,
                     key=key, **kw)
        except OverlongError as e:
            if self.cfg.data.overlong == "error":
                raise
            self.skips.long_sample(e)
            return None
        except NoStepsError as e:
            self.skips.bad_sample(raw, e, "no_steps")
            return None
        except Exception as e:  # missing .json member, invalid JSON, wrong field types
            self.skips.bad_sample(raw, e, "bad_json")
            return None
        try:
            row["pixel_values"] = self.image(raw, decode)
        except Exception as e:  # missing / corrupt image
            self.skips.bad_sample(raw, e, "bad_image")
            return None
        sample.pop("_tok", None)
        row.update(key=key, meta=sample)
        return row


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)
