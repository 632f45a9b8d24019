"""Extension build cache (mmcoconut.kernels.build, mmcoconut.train.engines.ds_ops): content-keyed dirs, stale torch
locks cleared instead of waited on, one line per first build or wait, CPU ds_configs that need no DeepSpeed op
(that a 2-rank CPU training run builds nothing is asserted in test_train_ds.py).

The builds here compile a one-function C++ library (no torch headers used: about a second) through the same
torch.utils.cpp_extension.load path as the real ops. Subprocess timeouts only bound a hang; nothing is timed."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmcoconut.kernels import build as B

ROOT = Path(__file__).resolve().parents[1]
HANG = 600  # a build that waits on a lock forever would exceed this; a real one takes seconds


def tiny_src(d: Path, value: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "op.cpp").write_text(f'extern "C" int mmc_test_value() {{ return {value}; }}\n')
    (d / "op.h").write_text("// header: part of the source hash\n")
    return d


def build_code(src: Path, root: Path) -> str:
    return textwrap.dedent(f"""
        from pathlib import Path
        from mmcoconut.kernels import build as B
        print(B.build_cached("mmc_test_op", Path({str(src)!r}), ["op.cpp"], python_module=False,
                             root=Path({str(root)!r})), flush=True)
    """)


def run_build(src: Path, root: Path, timeout=HANG, **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    env.pop("RANK", None)
    return subprocess.Popen([sys.executable, "-c", build_code(src, root)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(p: subprocess.Popen, timeout=HANG) -> tuple[str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"build hung (> {timeout} s):\n{err[-3000:]}")
    assert p.returncode == 0, err[-3000:]
    return out, err


def test_two_source_hashes_use_two_dirs_and_the_checkout_path_does_not_matter(tmp_path, capfd):
    root = tmp_path / "cache"
    a = tiny_src(tmp_path / "checkout_a" / "csrc", 1)
    lib_a = Path(B.build_cached("mmc_test_op", a, ["op.cpp"], python_module=False, root=root))
    err = capfd.readouterr().err
    assert err.count("building mmc_test_op, first run only, ~") == 1, err
    assert json.loads((lib_a.parent / "built.json").read_text())["key"]["src"] == B.tree_digest(a)

    same = tiny_src(tmp_path / "checkout_b" / "elsewhere", 1)  # same bytes, another checkout: same build
    assert B.plan_build("mmc_test_op", same, ["op.cpp"], python_module=False, root=root)[0] == lib_a.parent
    assert Path(B.build_cached("mmc_test_op", same, ["op.cpp"], python_module=False, root=root)) == lib_a
    assert "building" not in capfd.readouterr().err  # loaded from the cache: no compile, no line

    changed = tiny_src(tmp_path / "checkout_c" / "csrc", 2)
    lib_c = Path(B.build_cached("mmc_test_op", changed, ["op.cpp"], python_module=False, root=root))
    assert lib_c.parent != lib_a.parent and lib_a.is_file() and lib_c.is_file()
    assert sorted(p.name for p in root.iterdir()) == sorted([lib_a.parent.name, lib_c.parent.name])
    assert lib_a.parent.name.startswith("mmc_test_op-torch") and str(tmp_path) not in lib_a.parent.name
    (changed / "op.h").write_text("// a header edit is a new source hash too\n")
    assert B.plan_build("mmc_test_op", changed, ["op.cpp"], python_module=False, root=root)[0] != lib_c.parent
    # the flags are part of the key
    assert B.plan_build("mmc_test_op", a, ["op.cpp"], extra_cflags=["-O1"], python_module=False,
                        root=root)[0] != lib_a.parent


def test_a_killed_builds_lock_does_not_hang_the_next_build(tmp_path):
    """torch's `lock` baton left behind (as by Ctrl-C mid-build, no process holds it): the next build removes it
    with a warning and builds, instead of waiting forever."""
    src, root = tiny_src(tmp_path / "csrc", 3), tmp_path / "cache"
    build_dir, _ = B.plan_build("mmc_test_op", src, ["op.cpp"], python_module=False, root=root)
    build_dir.mkdir(parents=True)
    (build_dir / "lock").write_text("")
    out, err = finish(run_build(src, root))
    assert f"warning: removing the stale build lock {build_dir / 'lock'}" in err, err
    assert "building mmc_test_op, first run only" in err and Path(out.strip()).is_file()
    assert not (build_dir / "lock").exists()


def test_a_live_build_is_waited_for_with_one_line(tmp_path):
    """Another process holds the build's flock (building): the next one says it waits, then uses that build."""
    src, root = tiny_src(tmp_path / "csrc", 4), tmp_path / "cache"
    build_dir, _ = B.plan_build("mmc_test_op", src, ["op.cpp"], python_module=False, root=root)
    build_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(build_dir / '.flock')!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = run_build(src, root)
        line = waiter.stderr.readline()  # blocks until the waiter says something: it must say why it waits
        assert "waiting for another process building mmc_test_op (first run only, ~" in line, line
    finally:
        holder.stdin.close()  # the holder exits without building; the kernel drops its flock
        holder.wait(timeout=HANG)
    out, err = finish(waiter)
    assert "building mmc_test_op, first run only" in err and Path(out.strip()).is_file()


def test_a_torch_lock_held_by_a_live_process_is_kept(tmp_path, capfd):
    """A torch baton still open in a live process (a build outside our flock) is not stale: it stays."""
    op_dir = tmp_path / "fused_adam"
    op_dir.mkdir()
    lock = op_dir / "lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys
        fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)
        print("held", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert B.lock_holders(lock) == [holder.pid]
        with B.build_lock(op_dir, "DeepSpeed op fused_adam", 1):
            B.clear_stale_lock(op_dir, "DeepSpeed op fused_adam")
        assert lock.exists()
        assert f"waiting for DeepSpeed op fused_adam: being built by pid {holder.pid}" in capfd.readouterr().err
    finally:
        holder.stdin.close()
        holder.wait(timeout=HANG)
    from mmcoconut.train.engines import ds_ops
    ds_ops.clear_stale_locks(tmp_path)  # now nobody holds it: removed with a warning
    assert not lock.exists() and "warning: removing the stale build lock" in capfd.readouterr().err


def test_cpu_ds_settings_need_no_op_compile(monkeypatch):
    from mmcoconut.train.engines import ds_ops
    monkeypatch.setattr(ds_ops, "is_cpu", lambda: True)
    adamw = lambda **p: {"optimizer": {"type": "AdamW", "params": dict(lr=1e-4, **p)}}  # noqa: E731
    params = ds_ops.cpu_defaults(adamw())["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True  # torch's fused CPU AdamW: FusedAdam's speed
    assert ds_ops.needed_ops(ds_ops.cpu_defaults(adamw())) == []
    assert "fused" not in ds_ops.cpu_defaults(adamw(torch_adam=True))["optimizer"]["params"]  # the file chose
    assert "fused" not in ds_ops.cpu_defaults(adamw(foreach=True))["optimizer"]["params"]
    assert ds_ops.cpu_defaults(adamw(torch_adam=False))["optimizer"]["params"]["torch_adam"] is False  # explicit
    assert ds_ops.needed_ops(adamw(torch_adam=False)) == ["FusedAdamBuilder"]
    offload = dict(adamw(), zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu"}})
    assert ds_ops.needed_ops(offload) == ["CPUAdamBuilder"]
    monkeypatch.setattr(ds_ops, "is_cpu", lambda: False)  # GPU configs keep DeepSpeed's fused optimizer
    assert "torch_adam" not in ds_ops.cpu_defaults(adamw())["optimizer"]["params"]
    assert ds_ops.needed_ops(adamw()) == ["FusedAdamBuilder"]
    monkeypatch.undo()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the real path on this CPU machine: every shipped file
    from mmcoconut.config import load_config
    from mmcoconut.train.engines.ds_config import resolve_ds_config
    for f in sorted((ROOT / "ds_configs").glob("*_2gpu.json")):
        ds = resolve_ds_config(load_config(None, ["--train.precision=fp32"]), str(f), world=2)
        assert ds["optimizer"]["params"]["torch_adam"] is True and ds_ops.needed_ops(ds) == [], f
    import torch  # DeepSpeed hands the remaining params to torch.optim.AdamW: fused=True must be accepted there
    p = torch.nn.Parameter(torch.ones(3))
    params = {k: v for k, v in ds["optimizer"]["params"].items() if k != "torch_adam"}
    opt = torch.optim.AdamW([p], **params)
    p.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["fused"] is True and p.detach().lt(1).all()
