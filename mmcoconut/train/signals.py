"""Stop requests: SIGTERM / SIGINT / SIGUSR1 -> finish the optimizer step, checkpoint, exit EXIT_STOPPED.

The first signal only sets a flag. The training loop puts it into its one per-step collective, so every rank
sees the request at the same optimizer-step boundary, saves a checkpoint and exits with EXIT_STOPPED (75,
"stopped, resume me"). A second signal exits at once with 128 + signal number and saves nothing.

Launchers forward one request as several signals within milliseconds (a terminal's Ctrl-C reaches every
process of the foreground group, DeepSpeed's launcher then SIGTERMs its children, pdsh sends SIGINT then
SIGTERM), so signals within DEDUP_S (3 s; env MMCOCONUT_SIGNAL_DEDUP_S) of the first one count as the same request.
A rank whose launcher died gets a SIGTERM from the kernel (launcher_watch.py): a stop request, never a second signal.

A second signal must work even while the main thread is blocked in C (a collective whose peer died, a long
write), where Python signal handlers do not run. So the handler is a no-op and the work is done by a watcher
thread woken through `signal.set_wakeup_fd`, which the interpreter writes from the C-level handler at once.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_STOPPED = 0, 1, 2, 75  # 75 = EX_TEMPFAIL: try again (resume)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DEDUP_S = float(os.environ.get("MMCOCONUT_SIGNAL_DEDUP_S", "3"))


def record_exit_code(code: int) -> None:
    """Under launch.sh's torchrun (which reports any failing rank as 1): leave this rank's exit code in
    MMCOCONUT_EXIT_CODE_DIR/rank<RANK> for launch.sh to pass on."""
    code_dir = os.environ.get("MMCOCONUT_EXIT_CODE_DIR")
    if code_dir:
        try:
            with open(os.path.join(code_dir, f"rank{os.environ.get('RANK', '0')}"), "w") as f:
                f.write(f"{code}\n")
        except OSError:
            pass


def _say(msg: str) -> None:
    try:
        os.write(2, (msg + "\n").encode())
    except OSError:
        pass


class StopRequest:
    """Install once per process (main thread); `requested` is then polled by the loop at step boundaries."""

    def __init__(self, dedup_s: float = DEDUP_S, label: str = "train"):
        self.dedup_s, self.label = dedup_s, label
        self.signum: Optional[int] = None  # the first stop signal
        self.first_at: Optional[float] = None
        self.last_checkpoint: Optional[str] = None  # named in the message of an immediate exit
        self.reason: Optional[str] = None  # a stop that is no signal (request())
        self.launcher_pid: Optional[int] = None  # set by launcher_watch.py
        self._death_at: Optional[float] = None  # when the launcher's death signal came
        self._installed, self._old = False, {}
        self._rfd = self._wfd = -1

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def why(self) -> str:
        return self.reason or f"{self.name} received"

    def request(self, reason: str) -> None:
        """A stop request that is no signal (the launcher died: launcher_watch.py): a first request or nothing."""
        if self.signum is None:
            self.signum, self.first_at, self.reason = signal.SIGTERM, time.monotonic(), reason
            _say(f"{self.label}: {reason} (pid {os.getpid()}): finishing the optimizer step, saving a checkpoint, "
                 f"then exiting with code {EXIT_STOPPED}")

    def install(self) -> "StopRequest":
        if self._installed:
            return self
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, lambda s, f: None)  # the watcher thread does the work
        self._old_wakeup = signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name="mmcoconut-stop-signals", daemon=True).start()
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Back to the previous handlers (end of training: a signal now acts as without mmcoconut)."""
        if not self._installed:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._installed = False

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._rfd, 64)
            except OSError:
                return
            for signum in data:
                if signum in STOP_SIGNALS and self._installed:
                    self.on_signal(signum)

    def on_signal(self, signum: int, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and self._launcher_died(now):  # its death signal: never a second signal
            return self.request(f"the launcher (pid {self.launcher_pid}) is gone")
        if self.signum is None:
            self.signum, self.first_at = signum, now
            _say(f"{self.label}: {name} received (pid {os.getpid()}): finishing the optimizer step, saving a "
                 f"checkpoint, then exiting with code {EXIT_STOPPED}; send it again after {self.dedup_s:g} s to "
                 "exit at once without saving")
        elif now - self.first_at < self.dedup_s:
            pass  # the same request forwarded by a launcher
        else:
            last = f" (last checkpoint: {self.last_checkpoint})" if self.last_checkpoint else ""
            _say(f"{self.label}: second stop signal ({name}): exiting now without saving{last}")
            record_exit_code(128 + signum)
            os._exit(128 + signum)


    def _launcher_died(self, now: float) -> bool:
        """Whether a SIGTERM is the launcher's death signal (launcher_watch.py). A multi-threaded parent (torchrun)
        sends it once per exiting thread, the first before this process is reparented: wait a little for that."""
        if self.launcher_pid is None:
            return False
        if self._death_at is not None:
            return now - self._death_at < self.dedup_s
        deadline = time.monotonic() + 0.5
        while os.getppid() == self.launcher_pid:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        self._death_at = now
        return True


class Stopped(Exception):
    """Raised on every rank after the stop checkpoint is saved; the message is the requeue hint (exit EXIT_STOPPED)."""


_REQUEST: Optional[StopRequest] = None


def stop_request() -> StopRequest:
    """The process-wide StopRequest (installed on first use)."""
    global _REQUEST
    if _REQUEST is None:
        _REQUEST = StopRequest().install()
    return _REQUEST
