"""Where shards and sizes.json live: local paths, http(s) URLs, `pipe:CMD` (WebDataset's convention) and fsspec
URLs (s3://, gs://, ... when the backend is installed: `pip install 'mmcoconut[s3]'` / `[gcs]`).

- http(s) is read with urllib (a timeout per socket read; a connection that ends before Content-Length raises
  instead of looking like a clean end, which the streaming tar reader cannot tell apart).
- `pipe:CMD` runs CMD in a shell (WebDataset's convention; its stdout is the shard); a read that waits longer than
  the timeout or a non-zero exit is an error. (webdataset's own Pipe has no read timeout: a stalled command would
  block the worker for good.)
- other schemes go through fsspec; a missing backend is one clear error naming the extra to install.
Retries and skip accounting are not here (shardlist.ShardReader); this module only opens, reads and writes.
"""
from __future__ import annotations

import io
import os
import re
import select
import signal
import subprocess
import urllib.error
import urllib.request
from typing import Optional
from urllib.parse import urlsplit

PIPE = "pipe:"
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # scheme -> pip extra of mmcoconut
SHARD_NAME = re.compile(r"\.(tar|tgz|tar\.gz)$")
SIZES = "sizes.json"


def kind(url: str) -> str:
    """'local' | 'pipe' | 'http' | 'fsspec'."""
    if url.startswith(PIPE):
        return "pipe"
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("", "file"):
        return "local"
    return "http" if scheme in ("http", "https") else "fsspec"


def is_remote(url: str) -> bool:
    return kind(url) != "local"


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def fsspec_fs(url: str):
    """(filesystem, path) for an fsspec URL; ValueError naming the extra when the backend is missing."""
    import fsspec
    from fsspec.registry import known_implementations
    scheme = urlsplit(url).scheme.lower()
    if scheme not in known_implementations and scheme not in fsspec.available_protocols():
        raise ValueError(f"{url}: unknown URL scheme {scheme!r} (local paths, http(s)://, pipe:CMD or an fsspec "
                         "scheme such as s3:// or gs:// are read)")
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        extra = EXTRAS.get(scheme)
        how = f"pip install 'mmcoconut[{extra}]'" if extra else f"install fsspec's {scheme!r} backend"
        raise ValueError(f"{url}: reading {scheme}:// needs a backend that is not installed ({how}; "
                         f"{str(e).splitlines()[0]}), or stream it with a pipe: spec, e.g. "
                         "'pipe:aws s3 cp s3://bucket/train-000000.tar -'") from None
    return fs, path


# ---------------------------------------------------------------- reading
class _HTTPStream(io.RawIOBase):
    """An http(s) response body that raises when the connection closes before Content-Length bytes arrived
    (http.client's read(n) returns b'' then, which looks like a clean end of the tar)."""

    def __init__(self, url: str, timeout: float):
        self.url, self.got = url, 0
        req = urllib.request.Request(url, headers={"User-Agent": "mmcoconut"})
        self.resp = urllib.request.urlopen(req, timeout=timeout)
        self.total = self.resp.length

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.resp.readinto(b)
        if n == 0 and len(b) and self.total is not None and self.got < self.total:
            raise ConnectionError(f"connection closed after {self.got} of {self.total} bytes")
        self.got += n
        return n

    def close(self) -> None:
        if not self.closed:
            self.resp.close()
        super().close()


class _PipeStream(io.RawIOBase):
    """stdout of a `pipe:` command: raises when no byte arrives for `timeout` s, and at the end of the output
    when the command exited with an error."""

    def __init__(self, cmd: str, timeout: float):
        self.cmd, self.timeout = cmd, timeout
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=0, start_new_session=True)
        self.fd = self.proc.stdout.fileno()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not select.select([self.fd], [], [], self.timeout)[0]:
            raise TimeoutError(f"command gave no output for {self.timeout:g} s")
        data = os.read(self.fd, len(b))
        if not data:
            err = self.failure(wait=self.timeout)
            if err is not None:
                raise err
        b[:len(data)] = data
        return len(data)

    def failure(self, wait: Optional[float] = 2.0) -> Optional[OSError]:
        """The command's error exit (the real cause of an empty or short output), if it has exited with one."""
        try:
            rc = self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return None
        return OSError(f"command exited with status {rc}") if rc != 0 else None

    def close(self) -> None:
        """Stops the command if it is still running (a stream abandoned before its end)."""
        if not self.closed:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the shell and what it started (its own session)
                except ProcessLookupError:  # exited meanwhile
                    pass
            self.proc.stdout.close()
            self.proc.wait()
        super().close()


def open_stream(url: str, timeout: float):
    """A readable binary stream of the whole object (a shard)."""
    k = kind(url)
    if k == "local":
        return open(local_path(url), "rb")
    if k == "http":
        return io.BufferedReader(_HTTPStream(url, timeout), 1 << 20)
    if k == "pipe":
        return io.BufferedReader(_PipeStream(url[len(PIPE):], timeout), 1 << 16)
    fs, path = fsspec_fs(url)
    return fs.open(path, "rb")


def pipe_failure(stream) -> Optional[OSError]:
    """For a pipe: stream whose read failed: its command's error exit, the real cause (the tar reader only sees
    an empty or short stream)."""
    raw = getattr(stream, "raw", None)
    return raw.failure() if isinstance(raw, _PipeStream) else None


def is_permanent(exn: BaseException) -> bool:
    """Errors a retry cannot fix: missing object, access denied, a client error (4xx except timeouts/throttling)."""
    if isinstance(exn, urllib.error.HTTPError):
        return 400 <= exn.code < 500 and exn.code not in (408, 425, 429)
    return isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError))


def read_bytes(url: str, timeout: float) -> bytes:
    """A small object (sizes.json) in one piece. FileNotFoundError when it does not exist."""
    k = kind(url)
    if k == "local":
        with open(local_path(url), "rb") as f:
            return f.read()
    if k == "http":
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "mmcoconut"}),
                                        timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            if e.code in (403, 404, 410):
                raise FileNotFoundError(f"HTTP {e.code} {e.reason}") from None
            raise
    if k == "pipe":
        r = subprocess.run(url[len(PIPE):], shell=True, capture_output=True, timeout=max(timeout, 1.0))
        if r.returncode != 0:
            tail = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise FileNotFoundError(f"{url[len(PIPE):]!r} exited with status {r.returncode}: {tail[0]}")
        return r.stdout
    fs, path = fsspec_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def sizes_location(url: str) -> tuple[str, str]:
    """(where the sizes.json of this shard is, the shard's key in it). For `pipe:CMD` the sizes.json is read by
    the same command with the shard's file name replaced: 'pipe:aws s3 cp s3://b/d/train-000001.tar -' ->
    'pipe:aws s3 cp s3://b/d/sizes.json -'."""
    k = kind(url)
    if k == "local":
        p = local_path(url)
        return os.path.join(os.path.dirname(p), SIZES), os.path.basename(p)
    if k == "pipe":
        cmd = url[len(PIPE):]
        for m in re.finditer(r"[^\s'\"]+", cmd):
            name = m.group().rsplit("/", 1)[-1]
            if SHARD_NAME.search(name):
                start = m.end() - len(name)
                return PIPE + cmd[:start] + SIZES + cmd[m.end():], name
        raise FileNotFoundError(f"{url}: no shard file name (*.tar) in the command to locate its sizes.json by; "
                                "set data.samples_per_epoch")
    head, _, name = _no_query(url).rpartition("/")
    return f"{head}/{SIZES}", name


def _no_query(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0] if kind(url) == "http" else url


def parent(url: str) -> str:
    """The 'directory' of a remote URL, with a trailing '/'."""
    return _no_query(url).rpartition("/")[0] + "/"


# ---------------------------------------------------------------- writing (mmcoconut-shard --out)
class Target:
    """Where mmcoconut-shard puts finished files: a local dir, an fsspec URL (s3://bucket/dir) or a write-only
    `pipe:CMD` in which '{}' is replaced by each file name (e.g. 'pipe:aws s3 cp - s3://bucket/dir/{}')."""

    def __init__(self, out: str):
        self.out, self.kind = str(out), kind(str(out))
        if self.kind == "http":
            raise ValueError(f"--out {out}: HTTP has no standard upload; write through a command instead, e.g. "
                             f"--out 'pipe:curl -sf -T - {out.rstrip('/')}/{{}}', or to an fsspec URL")
        if self.kind == "pipe" and "{}" not in self.out:
            raise ValueError(f"--out {out}: a pipe: target needs '{{}}' where each file name goes, e.g. "
                             "'pipe:aws s3 cp - s3://bucket/shards/aokvqa/{}'")
        if self.kind == "fsspec":
            self.fs, self.root = fsspec_fs(self.out)
            self.root = self.root.rstrip("/")

    @property
    def readable(self) -> bool:
        return self.kind != "pipe"

    def names(self) -> list[str]:
        """File names directly in the target (fsspec); [] when it does not exist yet."""
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def read_text(self, name: str) -> Optional[str]:
        try:
            with self.fs.open(f"{self.root}/{name}", "rb") as f:
                return f.read().decode("utf-8")
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        self.fs.rm(f"{self.root}/{name}")

    def put(self, local: str, name: str) -> None:
        """Upload a finished local file under `name` (an object store makes it visible only when complete)."""
        if self.kind == "fsspec":
            self.fs.put_file(local, f"{self.root}/{name}")
            return
        cmd = self.out[len(PIPE):].replace("{}", name)
        with open(local, "rb") as f:
            r = subprocess.run(cmd, shell=True, stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if r.returncode != 0:
            tail = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise OSError(f"uploading {name}: {cmd!r} exited with status {r.returncode}: {tail[0]}")

    def where(self, name: str) -> str:
        return f"{self.out.rstrip('/')}/{name}" if self.kind == "fsspec" else self.out.replace("{}", name)
