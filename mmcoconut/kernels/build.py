"""C++/CUDA extension builds: the injection op (CPU and CUDA modules) and the build cache they share with
DeepSpeed's op builds (mmcoconut/train/engines/ds_ops.py).

Cache: ``$MMCOCONUT_EXT_DIR`` (default ``~/.cache/mmcoconut/extensions``) ``/<name>-<tag>-<key>/``, where key
hashes what determines the binary: torch version/commit/CUDA, Python ABI, machine, compiler identity, flags and
the bytes of every file in the source dir — never the checkout or venv path (sources are copied into the build
dir, so torch's ninja file names no checkout). A finished build writes ``built.json``; later loads import the
module from the cache directly (no ninja, no lock).

Locks: a build holds ``fcntl.flock`` on ``<dir>/.flock``; the kernel releases it when the holder dies, so a
torch ``lock`` baton found while holding it was left by a killed build (Ctrl-C during a first run) and is
removed with a warning instead of being waited on forever. A first build prints one line on local rank 0
("building X, first run only, ~N s"); waiting for another process's build prints one line too.

Several ranks may call :func:`load_extension` at once. Results (module or build error) are cached per process.
``python -m mmcoconut.cli.build_ops [cpu|cuda|all]`` builds ahead of time (``make install`` runs it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
MARKER = "built.json"
_CACHE: dict[str, object] = {}  # kind -> module or BaseException
_LOCK = threading.Lock()
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
# kind -> (module name, sources in CSRC, cflags, cuda cflags, ldflags, first-build estimate in s on 2 cores,
# python module?). Both ops register themselves with TORCH_LIBRARY (torch.ops.<name>), without pybind11 and
# torch/extension.h: a third of the compile time. The CUDA build targets TORCH_CUDA_ARCH_LIST (else the visible
# GPUs' architectures; bench/gpu_check.sh sets the device's).
KINDS = {
    "cpu": ("mmcoconut_inject_cpu", ["inject_cpu.cpp"], ["-O3", *_OPENMP], [], _OPENMP, 15, False),
    "cuda": ("mmcoconut_inject_cuda", ["inject_cuda.cu"], ["-O3"], ["-O3", "--expt-relaxed-constexpr"], [], 180,
             False),
}


# ---------------------------------------------------------------- what a build depends on
def local_rank0() -> bool:
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


def announce(msg: str) -> None:
    """One line on stderr from local rank 0 (all ranks of a node share the build cache); above any tqdm bar."""
    if local_rank0():
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
        sys.stderr.flush()


_COMPILER: dict[str, str] = {}


def compiler_id() -> str:
    """First line of `$CXX --version` (torch builds with $CXX, default c++)."""
    cxx = os.environ.get("CXX", "c++")
    if cxx not in _COMPILER:
        try:
            out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
            _COMPILER[cxx] = f"{cxx}: {out.splitlines()[0] if out else '?'}"
        except (OSError, subprocess.SubprocessError):
            _COMPILER[cxx] = f"{cxx}: not found"
    return _COMPILER[cxx]


def cuda_arch() -> dict:
    """What nvcc targets: TORCH_CUDA_ARCH_LIST, else the visible GPUs' capabilities."""
    caps = []
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return {"arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"), "capabilities": caps}


def platform_key() -> dict:
    """Everything outside the sources that the binary depends on (the same for every checkout and venv)."""
    return {"torch": torch.__version__, "torch_git": getattr(torch.version, "git_version", None),
            "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None),
            "python": f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}",
            "machine": platform.machine(), "system": platform.system(), "compiler": compiler_id()}


def tree_digest(root: Path) -> str:
    """sha256 over the relative names and bytes of every file under root."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and "__pycache__" not in q.parts):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_root() -> Path:
    base = os.environ.get("MMCOCONUT_EXT_DIR") or os.path.join("~", ".cache", "mmcoconut", "extensions")
    return Path(base).expanduser()


# ---------------------------------------------------------------- locks
def lock_holders(path: Path) -> list[int]:
    """Pids (this host, visible to us) with `path` open; torch's baton keeps its lock file open while building."""
    target, pids = str(path.resolve()) if path.exists() else str(path), []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for d in proc.iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            for fd in (d / "fd").iterdir():
                if os.readlink(fd) == target:
                    pids.append(int(d.name))
                    break
        except OSError:  # gone, or not ours
            continue
    return pids


def clear_stale_lock(build_dir: Path, what: str) -> None:
    """Call while holding build_lock(build_dir): torch's `lock` baton is stale unless a live process has it open."""
    lock = build_dir / "lock"
    if not lock.exists():
        return
    holders = lock_holders(lock)
    if holders:
        announce(f"waiting for {what}: being built by pid {', '.join(map(str, holders))} (lock {lock})")
        return  # torch's baton waits for it, and we have said why
    print(f"warning: removing the stale build lock {lock} of {what} (left by a killed build; no process holds "
          "it)", file=sys.stderr, flush=True)
    lock.unlink(missing_ok=True)


@contextlib.contextmanager
def build_lock(build_dir: Path, what: str, estimate_s: float) -> Iterator[bool]:
    """Exclusive flock on <build_dir>/.flock for the duration of a build (released by the kernel on death).
    Yields whether the lock is held (False only where the file system has no flock)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir / ".flock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            announce(f"waiting for another process building {what} (first run only, ~{estimate_s:.0f} s)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock (some NFS mounts): torch's own baton still serialises
            announce(f"warning: cannot flock in {build_dir} ({e}); a stale torch lock there is not cleared")
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the flock


# ---------------------------------------------------------------- cached builds
def import_built(build_dir: Path, parts: Optional[dict] = None):
    """The module recorded in <build_dir>/built.json (built from `parts`, when given), else None."""
    try:
        meta = json.loads((build_dir / MARKER).read_text())
        path = build_dir / meta["file"]
        if not path.is_file() or (parts is not None and meta.get("key") != json.loads(json.dumps(parts, default=str))):
            return None
        if not meta.get("python_module", True):
            if not ops_registered(meta["module"]):  # a process registers a TORCH_LIBRARY namespace once
                torch.ops.load_library(str(path))
            return str(path)
        spec = importlib.util.spec_from_file_location(meta["module"], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    except (OSError, ValueError, KeyError, ImportError):
        return None


def ops_registered(namespace: str) -> bool:
    """Whether a TORCH_LIBRARY build registered torch.ops.<namespace>.forward in this process."""
    try:
        getattr(getattr(torch.ops, namespace), "forward")
        return True
    except (AttributeError, RuntimeError):
        return False


def write_marker(build_dir: Path, module, seconds: float, parts: dict, python_module: bool = True) -> None:
    path = Path(module if isinstance(module, str) else module.__file__)
    meta = {"file": path.name, "module": path.name.split(".")[0], "python_module": python_module,
            "seconds": round(seconds, 1), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "key": parts}
    tmp = build_dir / (MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, build_dir / MARKER)


def estimate(root: Path, pattern: str, default: float) -> float:
    """Seconds the newest finished build matching root/pattern/built.json took (this machine), else `default`."""
    metas = sorted(root.glob(f"{pattern}/{MARKER}"), key=lambda p: p.stat().st_mtime)
    for p in reversed(metas):
        try:
            return float(json.loads(p.read_text())["seconds"])
        except (OSError, ValueError, KeyError):
            continue
    return default


def plan_build(name: str, src_dir: Path, sources: list[str], *, extra_cflags=(), extra_cuda_cflags=(),
               extra_ldflags=(), key_extra: Optional[dict] = None, python_module: bool = True,
               root: Optional[Path] = None) -> tuple[Path, dict]:
    """(build dir, key parts) of an extension: the dir name is <name>-<torch>-<python>-<hash of the parts>."""
    parts = {"name": name, "platform": platform_key(), "sources": list(sources), "cflags": list(extra_cflags),
             "cuda_cflags": list(extra_cuda_cflags), "ldflags": list(extra_ldflags),
             "src": tree_digest(src_dir), "python_module": python_module, **(key_extra or {})}
    tag = f"torch{torch.__version__.replace('+', '_')}-{parts['platform']['python']}"
    return (root or cache_root()) / f"{name}-{tag}-{key_of(parts)}", parts


def build_cached(name: str, src_dir: Path, sources: list[str], *, extra_cflags=(), extra_cuda_cflags=(),
                 extra_ldflags=(), key_extra: Optional[dict] = None, python_module: bool = True,
                 estimate_s: float = 30, root: Optional[Path] = None):
    """Build `sources` (names in src_dir; every file of src_dir is copied and hashed) as extension `name`, or
    import the cached build. Returns the module (python_module) or the path of the loaded library."""
    from torch.utils.cpp_extension import load

    build_dir, parts = plan_build(name, src_dir, sources, extra_cflags=extra_cflags,
                                  extra_cuda_cflags=extra_cuda_cflags, extra_ldflags=extra_ldflags,
                                  key_extra=key_extra, python_module=python_module, root=root)
    root = build_dir.parent
    mod = import_built(build_dir, parts)
    if mod is not None:
        return mod
    est = estimate(root, f"{name}-*", estimate_s)
    with build_lock(build_dir, name, est) as locked:
        mod = import_built(build_dir, parts)  # built by the process we waited for
        if mod is not None:
            return mod
        if locked:
            clear_stale_lock(build_dir, name)
        src = build_dir / "src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(src_dir, src, ignore=shutil.ignore_patterns("__pycache__"))
        announce(f"building {name}, first run only, ~{est:.0f} s (cache {build_dir})")
        t0 = time.perf_counter()
        mod = load(name=name, sources=[str(src / s) for s in sources], build_directory=str(build_dir),
                   extra_cflags=list(extra_cflags), extra_cuda_cflags=list(extra_cuda_cflags) or None,
                   extra_ldflags=list(extra_ldflags), is_python_module=python_module,
                   verbose=os.environ.get("MMCOCONUT_EXT_VERBOSE") == "1")
        write_marker(build_dir, mod, time.perf_counter() - t0, parts, python_module)
    return mod


# ---------------------------------------------------------------- the injection op
def cuda_buildable() -> bool:
    return bool(torch.cuda.is_available() and torch.version.cuda)


def _build(kind: str):
    if kind not in KINDS:
        raise RuntimeError(f"no injection extension for device type {kind!r}")
    if kind == "cuda" and not cuda_buildable():
        raise RuntimeError("CUDA extension needs a CUDA build of torch and a visible GPU")
    name, sources, cflags, cuda_cflags, ldflags, est, python_module = KINDS[kind]
    if not python_module and ops_registered(name):  # loaded from another cache dir earlier in this process
        return _ops_module(name, "<already loaded>")
    mod = build_cached(name, CSRC, sources, extra_cflags=cflags, extra_cuda_cflags=cuda_cflags,
                       extra_ldflags=ldflags, key_extra={"cuda_arch": cuda_arch()} if kind == "cuda" else None,
                       estimate_s=est, python_module=python_module)
    return mod if python_module else _ops_module(name, mod)


def _ops_module(namespace: str, path: str):
    """A TORCH_LIBRARY build seen like the pybind11 module: .forward / .backward / .__file__."""
    import types
    ops = getattr(torch.ops, namespace)
    return types.SimpleNamespace(forward=ops.forward, backward=ops.backward, __file__=str(path))


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
