"""DeepSpeed's C++ ops without silent or repeated compiles.

DeepSpeed JIT-compiles an op the first time it is used, into ``$TORCH_EXTENSIONS_DIR/<op>``, silently, behind
torch's lock file. On the CPU accelerator a training run would compile two (measured in bench/RESULTS.md):
``deepspeed_shm_comm`` when init_distributed builds its TorchBackend, and ``fused_adam`` (``cpu_adam`` with
optimizer offload) in deepspeed.initialize. Here:

- cpu_defaults(ds): on the CPU accelerator an Adam/AdamW ds_config without its own ``torch_adam`` gets
  ``"torch_adam": true, "fused": true`` (DeepSpeed's switch to torch.optim.AdamW, with torch's fused CPU kernel:
  no compile, FusedAdam's speed). GPU configs keep FusedAdam.
- init_distributed(): TORCH_EXTENSIONS_DIR becomes ``<it>/deepspeed<ver>-<key>`` (key: torch, Python, compiler,
  CPU, DeepSpeed version, accelerator, CUDA archs), then deepspeed.init_distributed. On CPU the shm comm op is
  marked unavailable first: DeepSpeed uses it only in ``inference_all_reduce`` (AutoTP inference), never in
  training collectives, and has no setting for it, so we set its entry in DeepSpeed's own compatibility table
  (what DeepSpeed does on platforms without it). ``MMCOCONUT_DS_SHM_COMM=1`` keeps DeepSpeed's default.
- prepare(ds): before deepspeed.initialize, stale torch locks in the op dirs are cleared and each op the config
  needs is built under our flock with one line on rank 0 ("building DeepSpeed op X, first run only, ~N s"), or
  imported from a finished build directly, and registered with DeepSpeed's op loader so it compiles nothing.
"""
from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path

from mmcoconut.kernels import build as B

ESTIMATE_S = 60  # first build of one DeepSpeed CPU op on 2 cores (bench/RESULTS.md)
_KEYED = "MMCOCONUT_DS_EXTENSIONS_DIR"  # the keyed dir once chosen (so a second call does not nest it)


def is_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def cpu_defaults(ds: dict) -> dict:
    """CPU accelerator: torch's fused AdamW unless the ds_config chose (ds is changed in place and returned).
    torch_adam alone gives torch's for-loop AdamW, 5-20x slower per optimizer step than DeepSpeed's FusedAdam;
    `fused: true` (passed through to torch.optim.AdamW) matches FusedAdam's speed (bench/RESULTS.md)."""
    opt = ds.get("optimizer") or {}
    if is_cpu() and str(opt.get("type", "")).lower() in ("adam", "adamw"):
        params = opt.setdefault("params", {})
        if "torch_adam" not in params:
            params["torch_adam"] = True
            if not params.get("foreach"):
                params.setdefault("fused", True)
    return ds


def cpu_id() -> str:
    """CPU model and ISA flags (DeepSpeed's CPU ops build with -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        pick = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))][:2]
        return hashlib.sha256("\n".join(pick).encode()).hexdigest()[:16]
    except OSError:
        return platform.processor()


def extensions_dir() -> Path:
    """Set and return the keyed TORCH_EXTENSIONS_DIR for DeepSpeed's ops (idempotent)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import git_hash

    chosen = os.environ.get(_KEYED)
    if chosen and os.environ.get("TORCH_EXTENSIONS_DIR") == chosen:
        return Path(chosen)
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join("~", ".cache", "mmcoconut", "torch_extensions")
    acc = get_accelerator()
    parts = {"platform": B.platform_key(), "deepspeed": deepspeed.__version__, "deepspeed_git": git_hash,
             "accelerator": acc._name, "cpu": cpu_id(),
             "cuda_arch": B.cuda_arch() if acc.device_name() == "cuda" else None}
    d = Path(base).expanduser() / f"deepspeed{deepspeed.__version__}-{acc._name}-{B.key_of(parts)}"
    os.environ["TORCH_EXTENSIONS_DIR"] = os.environ[_KEYED] = str(d)
    return d


def init_distributed() -> None:
    """deepspeed.init_distributed with the keyed op cache, and without compiling the shm comm op on CPU."""
    import deepspeed

    root = extensions_dir()
    if is_cpu():
        if os.environ.get("MMCOCONUT_DS_SHM_COMM") == "1":
            _prebuild("ShareMemCommBuilder", root)
        else:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()


def needed_ops(ds: dict) -> list[str]:
    """DeepSpeed op builders that deepspeed.initialize will load for this config (optimizer ops)."""
    opt = ds.get("optimizer") or {}
    kind, params = str(opt.get("type", "")).lower(), opt.get("params") or {}
    zero = ds.get("zero_optimization") or {}
    offload = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme") and zero.get("stage", 0) > 0
    if kind in ("adam", "adamw"):
        return [] if params.get("torch_adam") else ["CPUAdamBuilder" if offload else "FusedAdamBuilder"]
    if kind == "adagrad":
        return ["CPUAdagradBuilder"] if offload else []
    if kind == "lion":
        return ["CPULionBuilder" if offload else "FusedLionBuilder"]
    if kind == "lamb":
        return ["FusedLambBuilder"]
    return []


def clear_stale_locks(root: Path) -> None:
    """A torch `lock` in an op dir with no live holder was left by a killed build: remove it (warning)."""
    for lock in sorted(root.glob("*/lock")):
        with B.build_lock(lock.parent, f"DeepSpeed op {lock.parent.name}", ESTIMATE_S) as locked:
            if locked:
                B.clear_stale_lock(lock.parent, f"DeepSpeed op {lock.parent.name}")


def prepare(ds: dict) -> None:
    """Before deepspeed.initialize (after init_distributed): no stale locks, every needed op built or loaded."""
    root = extensions_dir()
    clear_stale_locks(root)
    for builder in needed_ops(ds):
        _prebuild(builder, root)


def _op_digest(b) -> str:
    """sha256 of an op's sources and include dirs as installed (what its build compiles)."""
    h = hashlib.sha256()
    for rel in [*b.sources(), *b.include_paths()]:
        p = Path(b.deepspeed_src_path(rel))
        h.update(rel.encode() + b"\0" + (B.tree_digest(p).encode() if p.is_dir() else
                                         p.read_bytes() if p.is_file() else b"missing"))
    return h.hexdigest()


def _prebuild(class_name: str, root: Path) -> None:
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    acc = get_accelerator()
    b = acc.create_op_builder(class_name)
    if b is None or type(b).__name__ == "NotImplementedBuilder":
        return
    name = b.NAME
    if installed_ops.get(name) and accelerator_name == acc._name:
        return  # compiled at pip install (DS_BUILD_OPS=1)
    loaded = next(c._loaded_ops for c in type(b).__mro__ if "_loaded_ops" in vars(c))
    if name in loaded:
        return
    op_dir, parts = root / name, {"op": name, "sources": _op_digest(b)}
    mod = B.import_built(op_dir, parts)
    if mod is None:
        what = f"DeepSpeed op {name}"
        est = B.estimate(root.parent, f"*/{name}", ESTIMATE_S)
        with B.build_lock(op_dir, what, est) as locked:
            mod = B.import_built(op_dir, parts)
            if mod is None:
                if locked:
                    B.clear_stale_lock(op_dir, what)
                B.announce(f"building {what}, first run only, ~{est:.0f} s (cache {op_dir})")
                t0 = time.perf_counter()
                mod = b.load(verbose=False)
                B.write_marker(op_dir, mod, time.perf_counter() - t0, parts)
    loaded[name] = mod
