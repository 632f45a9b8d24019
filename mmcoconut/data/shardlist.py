"""Shard specs -> URL lists, sample counts from sizes.json, and reading shards with retries.

A spec is a '::'-joined list of parts; each part is
- local: a directory (all *.tar), 'dir/train' (dir/train-*.tar), a brace pattern of existing files, one file;
- `https://host/d/train-{000000..000127}.tar` (brace pattern or one .tar URL); 'https://host/d/train' and
  'https://host/d/' (HTTP cannot list: resolved through the sizes.json there, keys train-*.tar / *.tar);
- `pipe:CMD`, brace-expanded into one command per shard (WebDataset's convention);
- an fsspec URL (s3://, gs://, ...): brace pattern, one object, a 'directory' or a prefix (listed).
"""
from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import random
import tarfile
import time
from typing import Iterator, Optional

import braceexpand
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_expander

from . import remote

log = logging.getLogger(__name__)
MAX_RETRY_WAIT = 60.0  # seconds; the exponential backoff stops growing here
_jitter = random.Random()  # private: must not touch the seeded global RNG


def _raw_json_error(spec: str, part: str) -> FileNotFoundError:
    stem = os.path.splitext(os.path.basename(part))[0]
    return FileNotFoundError(f"shard spec {spec!r}: {part} is a json file, not WebDataset shards; shard it "
                             f"first: mmcoconut-shard --json {part} --out shards/{stem} "
                             f"(or --aokvqa-dir/--coco-dir for official A-OKVQA), then point "
                             f"data.train_shards/val_shards at shards/{stem}")


def _expand_local(spec: str, part: str) -> list[str]:
    part = remote.local_path(part)
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
    return found


def _expand_fsspec(part: str) -> list[str]:
    fs, path = remote.fsspec_fs(part)
    if "{" in part:
        return list(braceexpand.braceexpand(part))
    if remote.SHARD_NAME.search(path):
        return [part]
    path = path.rstrip("/")
    pattern = f"{path}/*.tar" if fs.isdir(path) else f"{path}-*.tar"
    return [fs.unstrip_protocol(p) for p in sorted(fs.glob(pattern))]


def _expand_http(spec: str, part: str, timeout: float) -> list[str]:
    """HTTP has no listing: a directory or prefix is resolved through the sizes.json next to the shards."""
    if "{" in part:
        return list(braceexpand.braceexpand(part))
    if remote.SHARD_NAME.search(part.split("?", 1)[0]):
        return [part]
    tries = [(part.rstrip("/") + "/", "*.tar")]  # a directory
    if not part.endswith("/"):
        tries.insert(0, (remote.parent(part), part.rstrip("/").rsplit("/", 1)[-1] + "-*.tar"))  # a prefix
    for base, pat in tries:
        try:
            sizes = json.loads(remote.read_bytes(base + remote.SIZES, timeout))
        except Exception:  # missing / unreadable: try the next reading of `part`
            continue
        names = sorted(n for n in sizes if fnmatch.fnmatchcase(n, pat))
        if names:
            return [base + n for n in names]
    raise FileNotFoundError(f"shard spec {spec!r}: no shards found for {part!r}; HTTP cannot list directories, so "
                            "give a brace pattern (https://host/dir/train-{000000..000127}.tar) or a prefix/"
                            "directory whose sizes.json names the shards")


def expand_shards(spec: str, *, timeout: float = 60.0) -> list[str]:
    """Shard spec -> list of URLs (see the module docstring). FileNotFoundError / ValueError name the spec."""
    if not spec:
        raise FileNotFoundError("no shards given (data.train_shards / data.val_shards is empty)")
    urls: list[str] = []
    for part in spec.split("::"):
        k = remote.kind(part)
        if k == "local" and part.endswith(".json"):  # e.g. the seed config's train_path: raw data, not shards
            raise _raw_json_error(spec, part)
        if k == "local":
            found = _expand_local(spec, part)
        elif k == "pipe":
            found = list(braceexpand.braceexpand(part))
        elif k == "http":
            found = _expand_http(spec, part, timeout)
        else:
            found = _expand_fsspec(part)
        if not found:
            raise FileNotFoundError(f"shard spec {spec!r}: no .tar files match {part!r} "
                                    "(give a directory, dir/<split>, a brace pattern, a URL or a '::' list)")
        urls += found
    return urls


def count_samples(url: str, timeout: float = 60.0) -> int:
    """Distinct sample keys in one shard (headers only for local files; remote ones are streamed)."""
    if not remote.is_remote(url):
        with tarfile.open(remote.local_path(url)) as tf:
            return len({m.name.split(".", 1)[0] for m in tf.getmembers() if m.isfile()})
    stream = remote.open_stream(url, timeout)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            n = len({m.name.split(".", 1)[0] for m in tf if m.isfile()})
        while stream.read(1 << 16):  # padding; a pipe's end of output checks its exit status
            pass
        return n
    finally:
        stream.close()


def _fetch_sizes(where: str, timeout: float, retries: int) -> tuple[dict, str]:
    """(sizes, why it is empty)."""
    for attempt in range(retries + 1):
        try:
            sizes = json.loads(remote.read_bytes(where, timeout))
            if not isinstance(sizes, dict):
                raise ValueError("not a json object")
            return sizes, ""
        except FileNotFoundError as e:
            return {}, f"is missing ({e})" if remote.is_remote(where) else "is missing"
        except ValueError as e:
            raise ValueError(f"{where}: not a sizes.json ({{shard name: sample count}}): {e}") from None
        except Exception as e:  # network: retry, then give the cause
            if attempt == retries:
                return {}, f"could not be read ({_describe(e)})"
            time.sleep(min(MAX_RETRY_WAIT, 2 ** attempt))
    return {}, "could not be read"  # not reached


def shard_sizes(urls: list[str], count_missing: bool = False, *, timeout: float = 60.0,
                retries: int = 2) -> list[int]:
    """Samples per shard from the sizes.json next to each shard ({basename: count}, open_clip convention),
    fetched once per location (http, fsspec, or the pipe command with the shard name replaced)."""
    cache: dict[str, tuple[dict, str]] = {}
    out = []
    for u in urls:
        where, name = remote.sizes_location(u)
        if where not in cache:
            cache[where] = _fetch_sizes(where, timeout, retries)
        sizes, why = cache[where]
        n = sizes.get(name)
        if n is None and count_missing:  # eval: count distinct keys
            n = count_samples(u, timeout)
        if n is None:
            why = why or f"has no entry {name!r}"
            raise FileNotFoundError(f"no sample count for shard {u}: {where} {why}; set "
                                    f"data.samples_per_epoch or put sizes.json (from mmcoconut-shard) there")
        out.append(int(n))
    return out


# ---------------------------------------------------------------- reading with retries
class ShardError(IOError):
    """A shard given up on after its retries (passed to SkipCounter.handler: counted as unreadable shard data)."""


def _describe(exn: BaseException) -> str:
    msg = str(exn.args[0]) if exn.args else ""
    return f"{type(exn).__name__}: {msg.split(' @ <')[0]}" if msg else type(exn).__name__


class ShardReader:
    """Raw samples of shards, one shard after another.

    A shard that fails to open or breaks mid-stream (or, remote, ends short of its sizes.json count) is
    re-opened up to `retries` times, waiting `wait`, 2*wait, ... seconds; the re-opened stream skips the samples
    already yielded, so nothing is repeated. Then it is given up: its unread samples (its `expected` count from
    sizes.json minus those read; 1 when unknown) are counted through `skips.handler`, so the skip fraction and the
    metrics see the real loss, and the next shard follows. Local files are retried only for OS errors (a corrupt
    file stays corrupt).
    """

    def __init__(self, skips, retries: int = 3, wait: float = 1.0, timeout: float = 60.0,
                 expected: Optional[dict] = None):
        self.skips, self.retries, self.wait, self.timeout = skips, retries, wait, timeout
        self.expected = expected or {}

    @classmethod
    def from_config(cls, data_cfg, skips, expected: Optional[dict] = None) -> "ShardReader":
        return cls(skips, data_cfg.shard_retries, data_cfg.shard_retry_wait, data_cfg.shard_timeout, expected)

    def _retryable(self, url: str, exn: BaseException) -> bool:
        if remote.is_permanent(exn):
            return False
        return remote.is_remote(url) or isinstance(exn, OSError) and not isinstance(exn, tarfile.TarError)

    def _attempt(self, url: str, limit: Optional[int], read: list):
        """Open `url` once and yield its samples after the first read[0] (yielded before), counting in read[0]."""
        stream = remote.open_stream(url, self.timeout)
        try:
            files = tar_file_expander([{"url": url, "stream": stream}], handler=reraise_exception)
            for n, raw in enumerate(group_by_keys(files, handler=self.skips.handler), 1):
                if n <= read[0]:
                    continue  # re-opened after a break: yielded already
                read[0] = n
                yield raw
                if limit is not None and n >= limit:
                    return
            while stream.read(1 << 16):  # the tar's zero padding; a pipe's end of output checks its exit status
                pass
        except Exception as exn:
            raise (remote.pipe_failure(stream) or exn) from None
        finally:
            stream.close()  # a pipe's command still running (abandoned early) is stopped

    def shard(self, url: str, limit: Optional[int] = None):
        """Yield the raw samples of `url` (at most `limit`). Returns None when the shard was read to its end,
        else the number of samples yielded (stopped at `limit`, or given up after the retries)."""
        read, attempt = [0], 0
        expected = self.expected.get(url) if remote.is_remote(url) else None
        while True:
            try:
                if limit is None or read[0] < limit:
                    yield from self._attempt(url, limit, read)
                if limit is not None and read[0] >= limit:
                    return read[0]
                if expected is not None and read[0] < expected:
                    raise ConnectionError(f"stream ended after {read[0]} of {expected} samples (sizes.json)")
                return None
            except Exception as exn:
                attempt += 1
                if attempt > self.retries or not self._retryable(url, exn):
                    tries = f"{attempt} attempt{'s' * (attempt > 1)}"
                    size = self.expected.get(url)  # what the shard holds: its unread samples are lost, not 1
                    lost = max(1, size - read[0]) if size is not None else 1
                    held = f"; its {lost} unread sample(s) (sizes.json) count as skipped" if size is not None else ""
                    self.skips.handler(ShardError(f"shard {url}: gave up after {tries}, {read[0]} samples read: "
                                                  f"{_describe(exn)}{held}"), lost)
                    return read[0]
                pause = min(MAX_RETRY_WAIT, self.wait * 2 ** (attempt - 1)) * _jitter.uniform(0.75, 1.25)
                log.warning("shard %s: %s after %d samples; retry %d/%d in %.1f s", url, _describe(exn), read[0],
                            attempt, self.retries, pause)
                time.sleep(pause)

    def read(self, urls) -> Iterator[dict]:
        for u in urls:
            yield from self.shard(u)
