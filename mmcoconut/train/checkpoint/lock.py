"""Run-dir lock: one training run (or checkpoint conversion) per run dir at a time.

`<run_dir>/run.lock` is held with an exclusive `flock` for the life of the process and names its holder (host,
pid, start time, command). The kernel drops a flock when its holder dies, however it dies (SIGKILL included), so
a lock that can be taken while the file still names a holder was left by a dead process: it is taken over with
a warning. A second run on a live run dir is refused with one error naming the holder.

Where the filesystem has no flock (some network filesystems return ENOLCK/EOPNOTSUPP), the holder's liveness is
checked directly: same host -> its pid must exist with the recorded start time; another host -> its heartbeat
(the file's mtime, touched every HEARTBEAT_S by the holder) must be younger than STALE_S.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from mmcoconut.config import ConfigError

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
HEARTBEAT_S, STALE_S = 60.0, 600.0


class RunDirLocked(ConfigError):
    """The run dir is in use by a live process (exit code 2, like every startup error)."""


def _proc_start(pid: int) -> Optional[str]:
    """Kernel start time of `pid` (field 22 of /proc/<pid>/stat): tells a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)) if started else "?"
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"
            + (f", command: {holder['command']}" if holder.get("command") else ""))


class RunLock:
    """`with RunLock(run_dir): ...` or acquire()/release(). acquire() raises RunDirLocked."""

    def __init__(self, run_dir, what: str = "training"):
        self.dir, self.what = Path(run_dir), what
        self.path = self.dir / LOCK_NAME
        self.fd: Optional[int] = None
        self._stop = threading.Event()
        self.took_over: Optional[dict] = None  # the dead holder whose lock was taken over

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _holder_alive(self, holder: dict) -> bool:
        """Liveness without flock: same host -> pid + start time; other host -> heartbeat age."""
        if not holder.get("pid"):
            return False
        if holder.get("host") == socket.gethostname():
            pid = int(holder["pid"])
            return _alive(pid) and (holder.get("proc_start") in (None, _proc_start(pid)))
        try:
            return time.time() - self.path.stat().st_mtime < STALE_S
        except OSError:
            return False

    def acquire(self) -> "RunLock":
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flock = True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise RunDirLocked(f"run dir {self.dir} is in use by another {self.what} run "
                                   f"({describe(self._read())}); wait for it to finish or stop it, or use another "
                                   "train.name / logging.run_dir") from None
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            flock = False  # no flock on this filesystem: check the recorded holder ourselves
        old = self._read()
        if old.get("pid") and not flock and self._holder_alive(old):
            os.close(fd)
            raise RunDirLocked(f"run dir {self.dir} is in use by another {self.what} run ({describe(old)}); wait "
                               f"for it to finish or stop it, or use another train.name / logging.run_dir")
        if old.get("pid"):
            self.took_over = old
            log.warning("run dir %s: taking over the lock of a %s run that is gone (%s)", self.dir,
                        old.get("what", "previous"), describe(old))
            print(f"warning: run dir {self.dir}: taking over the lock of a run that is gone ({describe(old)})",
                  file=sys.stderr, flush=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
              "started": round(time.time(), 3), "what": self.what, "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if not flock:
            threading.Thread(target=self._heartbeat, name="mmcoconut-lock-heartbeat", daemon=True).start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Clear the holder record and unlock (the file stays: removing it would race with a new holder)."""
        if self.fd is None:
            return
        self._stop.set()
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
