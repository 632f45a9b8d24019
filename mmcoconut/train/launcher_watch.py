"""A rank whose launcher dies stops the way a preempted run stops: finish the step, save, exit 75 (signals.py).

`deepspeed --num_gpus N -m mmcoconut.train` runs DeepSpeed's runner, which starts the per-node launcher
(`deepspeed.launcher.launch`), which starts the ranks. A signal to the runner kills it alone: the launcher and the
ranks used to go on training as orphans. A SIGKILLed per-node launcher or torchrun orphans its ranks the same way.
So a rank under a launcher
- asks the kernel for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG, Linux); the stop handler sees that
  the parent is gone and makes it a stop request that never counts as a second signal;
- checks once a second, in a thread, that its parent is still its parent and, under DeepSpeed's per-node launcher,
  that the launcher's parent (the runner) is still there (the launcher does not notice its runner's death).
Both only set the flag a signal sets: no collective, no host sync. The parent is checked again right after the
death signal is set, since it may have died before.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Optional

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PERIOD_S = 1.0
DS_LAUNCHER = "deepspeed.launcher.launch"


def ppid_of(pid: int) -> Optional[int]:
    """The parent of `pid` (from /proc), None when it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """SIGTERM to this process when its parent (thread) exits; False where prctl is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class LauncherWatch:
    """Started once per rank under a launcher (cli/train.py), before anything slow."""

    def __init__(self, stop, period_s: float = PERIOD_S):
        self.stop, self.period_s = stop, period_s
        self.parent = os.getppid()
        # DeepSpeed's per-node launcher outlives its runner: watch the runner too
        self.runner = ppid_of(self.parent) if DS_LAUNCHER in _cmdline(self.parent) else None
        stop.launcher_pid = self.parent  # a SIGTERM once the parent is gone is its death signal (signals.py)

    def gone(self) -> Optional[str]:
        """Why the launch is gone, or None."""
        if os.getppid() != self.parent:
            return f"the launcher (pid {self.parent}) is gone"
        if self.runner is not None and self.runner > 1 and ppid_of(self.parent) != self.runner:
            return f"DeepSpeed's runner (pid {self.runner}) is gone"
        return None

    def start(self) -> "LauncherWatch":
        set_parent_death_signal()
        why = self.gone()  # the parent may have died before the death signal was set
        if why:
            self.stop.request(why)
            return self
        threading.Thread(target=self._loop, name="mmcoconut-launcher-watch", daemon=True).start()
        return self

    def _loop(self) -> None:
        while True:
            time.sleep(self.period_s)
            why = self.gone()
            if why:
                self.stop.request(why)
                return
