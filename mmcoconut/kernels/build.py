"""Lazy JIT build of the injection extensions (CPU and CUDA are separate modules).

Build dir: ``$MMCOCONUT_EXT_DIR/<torch version>/<name>`` (default base ``~/.cache/mmcoconut/extensions``).
torch.utils.cpp_extension serialises concurrent builds of the same dir with a file baton, so several ranks
may call :func:`load_extension` at once. Results (module or the build error) are cached per process.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
STALE_LOCK_S = 1800  # a build lock older than this was left by a killed build (a build takes ~1-3 min)
_CACHE: dict[str, object] = {}  # kind -> module or BaseException
_LOCK = threading.Lock()


def extension_dir() -> Path:
    base = os.environ.get("MMCOCONUT_EXT_DIR") or os.path.join("~", ".cache", "mmcoconut", "extensions")
    tag = torch.__version__.replace("+", "_")
    return Path(base).expanduser() / tag


def cuda_buildable() -> bool:
    return bool(torch.cuda.is_available() and torch.version.cuda)


def _build(kind: str):
    from torch.utils.cpp_extension import load

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    if kind == "cpu":
        name, sources = "mmcoconut_inject_cpu", [CSRC / "inject_cpu.cpp"]
        kwargs = dict(extra_cflags=["-O3", *openmp], extra_ldflags=openmp)
    elif kind == "cuda":
        if not cuda_buildable():
            raise RuntimeError("CUDA extension needs a CUDA build of torch and a visible GPU")
        name, sources = "mmcoconut_inject_cuda", [CSRC / "inject_cuda.cu"]
        kwargs = dict(extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"])
    else:
        raise RuntimeError(f"no injection extension for device type {kind!r}")
    build_dir = extension_dir() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(build_dir / "lock")
    return load(name=name, sources=[str(s) for s in sources], build_directory=str(build_dir),
                verbose=os.environ.get("MMCOCONUT_EXT_VERBOSE") == "1", **kwargs)


def _remove_stale_lock(lock: Path) -> None:
    """torch's build baton: a killed build leaves `lock` behind and every later build waits on it forever."""
    import time
    import warnings

    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        warnings.warn(f"mmcoconut.kernels: removing a stale build lock {lock} ({age / 60:.0f} min old, left by a "
                      "killed build)", RuntimeWarning, stacklevel=3)
        lock.unlink(missing_ok=True)


def load_extension(kind: str):
    """Return the compiled module for ``kind`` ("cpu" | "cuda"); raises the (cached) build error."""
    with _LOCK:
        if kind not in _CACHE:
            try:
                _CACHE[kind] = _build(kind)
            except Exception as exc:  # noqa: BLE001 - cached and re-raised to the caller
                _CACHE[kind] = exc
        result = _CACHE[kind]
    if isinstance(result, BaseException):
        raise RuntimeError(f"mmcoconut {kind} injection extension unavailable: {result}") from result
    return result


def try_load_extension(kind: str):
    """Module for ``kind`` or None when it cannot be built (never raises)."""
    try:
        return load_extension(kind)
    except RuntimeError:
        return None
