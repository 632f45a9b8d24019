"""Crash consistency without DeepSpeed processes: run-dir lock, checkpoint index, config drift, disk full,
stop signals, step accounting, wandb run id."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmcoconut.config import ConfigError, load_config
from mmcoconut.train.checkpoint import drift, index
from mmcoconut.train.checkpoint.lock import RunDirLocked, RunLock

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- lock
def test_second_run_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirLocked) as e:
            RunLock(tmp_path / "run").acquire()
    msg = str(e.value)
    assert f"pid {os.getpid()}" in msg and "host " in msg and "started 20" in msg and "in use" in msg
    with RunLock(tmp_path / "run") as again:  # released: free again, no takeover
        assert again.took_over is None


def test_dead_holder_is_taken_over_with_a_warning(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mmcoconut.train.checkpoint.lock import RunLock; "
                               f"RunLock({str(tmp_path / 'run')!r}).acquire(); print('locked', flush=True); "
                               "time.sleep(600)"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirLocked, match=f"pid {holder.pid}"):
        RunLock(tmp_path / "run").acquire()
    holder.kill()  # SIGKILL: no cleanup; the kernel drops the flock, the record stays
    holder.wait()
    lock = RunLock(tmp_path / "run").acquire()
    assert lock.took_over["pid"] == holder.pid
    assert f"taking over the lock of a run that is gone (host {lock.took_over['host']}, pid {holder.pid}" \
        in capsys.readouterr().err
    lock.release()


def test_lock_without_flock_checks_the_recorded_pid(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    a = RunLock(tmp_path / "run").acquire()  # records this (live) process
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "run").acquire()
    a.release()
    rec = {"host": __import__("socket").gethostname(), "pid": 2 ** 22 + 12345, "started": time.time()}
    (tmp_path / "run" / "run.lock").write_text(json.dumps(rec))  # a dead pid on this host
    b = RunLock(tmp_path / "run").acquire()
    assert b.took_over["pid"] == rec["pid"]
    b.release()


# ---------------------------------------------------------------- index
def _tag(run, tag, step, files=None, meta=True):
    d = run / tag
    d.mkdir(parents=True)
    for name, data in (files or {"mp_rank_00_model_states.pt": b"x" * 100}).items():
        (d / name).write_bytes(data)
    if meta:
        index.write_meta(d, {"tag": tag, "step": step, "world_size": 2, "zero_stage": 2, "saved_at": step})


def test_atomic_write_leaves_old_or_new(tmp_path, monkeypatch):
    p = tmp_path / "checkpoints.json"
    index.atomic_write(p, '["a"]')

    def boom(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        index.atomic_write(p, '["a", "b"]')
    assert p.read_text() == '["a"]' and [x.name for x in tmp_path.iterdir()] == ["checkpoints.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_torn_index_is_rebuilt_and_partial_tags_removed(tmp_path, capsys):
    run = tmp_path / "run"
    _tag(run, "step00000003", 3)
    _tag(run, "epoch001", 8)
    _tag(run, "step00000006", 6)
    _tag(run, "step00000011", 11, meta=False)  # killed during the save
    _tag(run, "step00000009", 9)
    (run / "step00000009" / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)  # truncated after META
    (run / index.INDEX).write_text('["step00000003", "step000')  # torn
    (run / ".checkpoints.json.abc.tmp").write_text("[")
    (run / "latest").write_text("step00000011")  # DeepSpeed wrote it, then the process died before META
    assert index.list_tags(run) == ["step00000003", "step00000006", "epoch001"]
    assert "unreadable (torn write?)" in capsys.readouterr().err
    assert index.recover(run) == ["step00000003", "step00000006", "epoch001"]
    assert json.loads((run / index.INDEX).read_text()) == ["step00000003", "step00000006", "epoch001"]
    assert not (run / "step00000011").exists() and not (run / "step00000009").exists()
    assert not (run / ".checkpoints.json.abc.tmp").exists() and (run / "latest").read_text() == "epoch001"
    err = capsys.readouterr().err
    assert "removing partial checkpoint" in err and "file mp_rank_00_model_states.pt has 10 bytes, 100" in err


def test_complete_tag_missing_from_the_index_is_adopted_and_prune_is_meta_first(tmp_path):
    run = tmp_path / "run"
    for i, t in enumerate(["step00000002", "step00000004", "step00000006"]):
        _tag(run, t, 2 * (i + 1))
    index.write_index(run, ["step00000002", "step00000004"])  # died before recording step 6
    assert index.list_tags(run) == ["step00000002", "step00000004", "step00000006"]
    assert index.prune(run, index.list_tags(run), keep=2) == ["step00000004", "step00000006"]
    assert not (run / "step00000002").exists()


GARBLED = [b"\xff\xfe\x00\x9c garbage \xc3", b"", b"{\"tags\": [\"step00000006\"]}", b"[1, 2]", b"null",
           b'["../../etc", "step00000006"]', b"[" * 100_000, b'"step00000006"']


@pytest.mark.parametrize("garbage", GARBLED, ids=range(len(GARBLED)))
def test_garbled_latest_index_and_meta_never_crash_start_up(tmp_path, capsys, garbage):
    """Issue 26.7: an invalid-UTF-8 `latest` crashed every restart in fix_latest. Start-up must survive any bytes in
    `latest`, checkpoints.json and a tag's META: such files count as absent and are rewritten, with a warning."""
    from mmcoconut.train.checkpoint.resume import find_resume

    run = tmp_path / "run"
    _tag(run, "step00000003", 3)
    _tag(run, "step00000006", 6)
    for bad in ("step00000009", "step00000012", "step00000015", "step00000018"):
        _tag(run, bad, int(bad[4:]))
    (run / "step00000009" / index.META).write_bytes(garbage)  # garbled META: not a checkpoint
    (run / "step00000012" / index.META).write_text('["a list"]')
    (run / "step00000015" / index.META).write_text('{"step": "15", "files": {}}')
    (run / "step00000018" / index.META).write_text('{"step": 18, "files": ["mp_rank_00_model_states.pt"]}')
    (run / index.INDEX).write_bytes(garbage)
    (run / "latest").write_bytes(garbage)
    want = ["step00000003", "step00000006"]
    assert index.list_tags(run) == want
    assert "unreadable (torn write?) or not a list of checkpoint tags" in capsys.readouterr().err
    cfg = load_config(None, [f"--logging.run_dir={run}"])
    assert find_resume(cfg, 2, 2).tag == "step00000006"
    assert index.recover(run) == want
    assert json.loads((run / index.INDEX).read_text()) == want and (run / "latest").read_text() == "step00000006"
    assert not [t for t in ("step00000009", "step00000012", "step00000015", "step00000018") if (run / t).exists()]
    err = capsys.readouterr().err
    assert err.count(f"{run / 'latest'} was garbled") == 1 and err.count("removing partial checkpoint") == 4, err
    assert f"rewrote {run / index.INDEX}" in err
    (run / "latest").write_bytes(b"\x80\x81")  # and with no checkpoint at all: removed, not a crash
    for t in want:
        shutil.rmtree(run / t)
    assert index.recover(run) == [] and not (run / "latest").exists()
    assert "was garbled (UnicodeDecodeError" in capsys.readouterr().err


def test_out_of_order_index_does_not_decide_the_resume_point(tmp_path, capsys):
    """Issue 26.7: a valid checkpoints.json naming an older tag last made `resume: auto` take it, silently. The newest
    complete checkpoint by step wins, a warning says the index disagreed, and recover() rewrites it in step order."""
    from mmcoconut.train.checkpoint.resume import find_resume

    run = tmp_path / "run"
    for step in (3, 6, 9):
        _tag(run, f"step{step:08d}", step)
    index.write_index(run, ["step00000006", "step00000009", "step00000003"])
    (run / "latest").write_text("step00000003")
    cfg = load_config(None, [f"--logging.run_dir={run}"])
    assert find_resume(cfg, 2, 2).tag == "step00000009"
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "lists the checkpoints in another order than their steps" in err, err
    assert "newest step00000009" in err
    assert index.recover(run) == ["step00000003", "step00000006", "step00000009"]
    assert json.loads((run / index.INDEX).read_text()) == ["step00000003", "step00000006", "step00000009"]
    assert (run / "latest").read_text() == "step00000003"  # complete: left as it is (export tools read it)
    capsys.readouterr()
    assert find_resume(cfg, 2, 2).tag == "step00000009" and capsys.readouterr().err == ""  # agrees now: quiet
    index.write_index(run, ["step00000009", "step00000003"])  # a stale index (step 6 unrecorded), older tag last
    assert index.list_tags(run) == ["step00000003", "step00000006", "step00000009"]
    err = capsys.readouterr().err
    assert "['step00000006'] missing from" in err and "another order" in err


# ---------------------------------------------------------------- config drift
def test_drift_semantic_refused_allowed_and_harmless_noted(tmp_path):
    old = load_config(None, []).to_dict()
    new = load_config(None, ["--curriculum.c_thought=3", "--model.projector=linear", "--train.num_epochs=9",
                             "--train.lr=3e-4"])
    with pytest.raises(ConfigError) as e:
        drift.check(old, new.to_dict(), [], "run/epoch001")
    msg = str(e.value)
    assert "curriculum.c_thought 2 -> 3" in msg and "model.projector 'mlp2x_gelu' -> 'linear'" in msg
    assert "--checkpoint.allow_config_change=model.projector,curriculum.c_thought" in msg
    assert "num_epochs" not in msg and len(msg.splitlines()) == 1
    notes = drift.check(old, new.to_dict(), ["c_thought", "model.projector"], "run/epoch001")
    assert "allowed changes" in notes[0] and "train.num_epochs 6 -> 9" in notes[1] and "train.lr" in notes[1]
    assert drift.check(old, load_config(None, ["--logging.report_to=none"]).to_dict(), [], "x") == \
        ["resuming x with changed settings: logging.report_to 'wandb' -> 'none'"]
    old.pop("eval")  # a key the old run did not know counts as its default
    assert drift.check(old, load_config(None, []).to_dict(), [], "x") == []


def test_config_yaml_history(tmp_path):
    a = load_config(None, [f"--logging.run_dir={tmp_path}"])
    assert drift.write_config(tmp_path, a) == (None, {})
    assert drift.write_config(tmp_path, a) == (None, {})  # unchanged: nothing moved
    b = load_config(None, [f"--logging.run_dir={tmp_path}", "--train.num_epochs=9"])
    moved, changes = drift.write_config(tmp_path, b)
    assert moved.parent.name == "config_history" and "num_epochs: 6" in moved.read_text()
    assert changes == {"train.num_epochs": (6, 9)} and "num_epochs: 9" in (tmp_path / "config.yaml").read_text()


# ---------------------------------------------------------------- disk full
def test_disk_full_names_tag_and_free_space_and_keeps_previous(tmp_path):
    from mmcoconut.train.checkpoint.manager import CheckpointManager
    from mmcoconut.train.checkpoint.states import TrainState
    from mmcoconut.train.errors import TrainError

    run = tmp_path / "run"
    _tag(run, "step00000003", 3)
    index.write_index(run, ["step00000003"])

    class Engine:  # what the manager asks of an engine when a save fails
        rank = 0

        def save(self, run_dir, tag, client_state):
            (Path(run_dir) / tag).mkdir()
            (Path(run_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 6912 vs 6800")

    cfg = load_config(None, [f"--logging.run_dir={run}"])
    stream = SimpleNamespace(state_dict=lambda: {})
    with pytest.raises(TrainError) as e:
        CheckpointManager(cfg, Engine(), TrainState(step=6), stream).save("step00000006")
    msg = str(e.value)
    assert "checkpoint step00000006 could not be written" in msg and "no space left on device" in msg
    assert " free there" in msg and "previous checkpoint step00000003 is intact" in msg
    assert not (run / "step00000006").exists() and index.list_tags(run) == ["step00000003"]


# ---------------------------------------------------------------- stop signals
SIG_SCRIPT = r'''
import os, signal, sys, time
from mmcoconut.train.signals import stop_request
req = stop_request()
print("ready", flush=True)
while not req.requested:
    time.sleep(0.01)
print("requested", req.name, flush=True)
time.sleep(0.2)
os.kill(os.getpid(), signal.SIGTERM)  # within the window: the same request
time.sleep(1.0)
print("still here", flush=True)
sys.stdin.readline()  # blocked in C (a read) when the second signal comes: it must still exit at once
'''


def test_first_signal_flags_repeats_merge_second_exits_at_once(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", SIG_SCRIPT], cwd=ROOT, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), MMCOCONUT_SIGNAL_DEDUP_S="0.5"))
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGUSR1)
    assert p.stdout.readline().split() == ["requested", "SIGUSR1"]
    assert p.stdout.readline().strip() == "still here"
    p.send_signal(signal.SIGINT)
    p.wait(timeout=30)  # stdin stays open: the main thread stays blocked in its read
    err = p.stderr.read()
    assert p.returncode == 128 + signal.SIGINT, err
    assert "SIGUSR1 received" in err and "second stop signal (SIGINT): exiting now without saving" in err


LAUNCH_TREE = r'''
import os, subprocess, sys, time
mode, period = sys.argv[1], sys.argv[2]
if mode == "runner":  # DeepSpeed's runner: starts the per-node launcher (named by its command line) and waits
    subprocess.Popen([sys.executable, __file__, "launcher", period, "deepspeed.launcher.launch"])
    time.sleep(600)
elif mode == "launcher":  # the per-node launcher, or torchrun (threads: each sends the death signal as it exits)
    import threading
    for _ in range(4):
        threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
    subprocess.Popen([sys.executable, __file__, "rank", period])
    time.sleep(600)
else:  # a rank, set up as cli/train.py does
    from mmcoconut.train.launcher_watch import LauncherWatch
    from mmcoconut.train.signals import stop_request
    req = stop_request()
    LauncherWatch(req, period_s=float(period)).start()
    print("rank", os.getpid(), os.getppid(), flush=True)
    t0 = time.time()
    while not req.requested and time.time() < t0 + 20:
        time.sleep(0.01)
    print("requested:", req.why if req.requested else "none", flush=True)
    time.sleep(2.0)  # "saving": the launcher's death signal must not cut it short
    print("saved", flush=True)
'''


def _kill(*pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("case", ["runner dies", "launcher dies", "launcher dies after a signal"])
def test_rank_stops_when_its_launcher_or_deepspeeds_runner_dies(tmp_path, case):
    """Issue 26.9: SIGTERM/SIGKILL to `deepspeed` (the runner) left its per-node launcher and the ranks training as
    orphans. A rank must make it a stop request (save, exit 75): the runner's death through the watch thread, its
    parent's through the kernel's death signal (the watch thread's period is 60 s there), and that SIGTERM never
    counts as a second signal (which would exit without saving)."""
    script = tmp_path / "tree.py"
    script.write_text(LAUNCH_TREE)
    top = subprocess.Popen([sys.executable, str(script), "runner" if case == "runner dies" else "launcher",
                            "0.1" if case == "runner dies" else "60"], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=(tmp_path / "err").open("w"), text=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT), MMCOCONUT_SIGNAL_DEDUP_S="0.5"))
    first = top.stdout.readline().split()
    assert first[0] == "rank", first
    rank, parent = int(first[1]), int(first[2])
    guard = threading.Timer(40, _kill, (rank, parent))  # no hang: EOF at the latest then
    guard.start()
    try:
        if case == "launcher dies after a signal":
            os.kill(rank, signal.SIGUSR1)
            assert top.stdout.readline().strip() == "requested: SIGUSR1 received"
            time.sleep(1.0)  # past the 0.5 s in which repeats count as one request
        t0 = time.time()
        top.kill()  # SIGKILL: the runner, or the rank's own launcher
        top.wait()
        if case != "launcher dies after a signal":
            who = f"DeepSpeed's runner (pid {top.pid})" if case == "runner dies" else f"the launcher (pid {parent})"
            assert top.stdout.readline().strip() == f"requested: {who} is gone"
            assert time.time() - t0 < 10
        lines = []
        while (line := top.stdout.readline()) not in ("", "saved\n"):  # (the launcher may still hold the pipe)
            lines.append(line)
        rest = "".join(lines) + line
    finally:
        _kill(rank, parent)
        guard.cancel()
    err = (tmp_path / "err").read_text()
    assert rest.splitlines()[-1] == "saved" and "second stop signal" not in err, rest + err
    assert ("is gone (pid " in err) == (case != "launcher dies after a signal"), err


# ---------------------------------------------------------------- wandb run id
def test_wandb_run_id_kept_for_resume(monkeypatch, tmp_path):
    from mmcoconut.train.tracking import WANDB_ID_FILE, Tracker

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, [f"--logging.run_dir={tmp_path / 'run'}", "--logging.report_to=wandb"])
    first = Tracker(cfg, rank=0)
    run_id = first.run.id
    first.close()
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text().strip() == run_id
    resumed = Tracker(cfg, rank=0, resumed=True)
    assert resumed.run.id == run_id
    resumed.close()
    fresh = Tracker(cfg, rank=0, resumed=False)  # a fresh start in the same dir is a new wandb run
    assert fresh.run.id != run_id
    fresh.close()
    # both sessions logged under run_id (one dir, or two when they started in different seconds)
    assert list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))


def test_export_finds_the_newest_checkpoint_when_latest_is_garbled(tmp_path, capsys):
    """mmcoconut-export/eval/ask read a run's `latest` before any start has repaired it: garbled bytes or a tag that
    is gone mean the newest complete checkpoint by step (the trainer's rule), with a warning, not a crash."""
    from mmcoconut.export.ds_checkpoint import find_checkpoint

    run = tmp_path / "run"
    _tag(run, "step00000006", 6)
    _tag(run, "step00000003", 3)
    (run / "latest").write_text("step00000003")
    assert find_checkpoint(run) == (run, "step00000003")  # a readable latest is followed
    for garbage in (b"\xff\xfe\x9c", b"step00000099", b"../step00000003"):
        (run / "latest").write_bytes(garbage)
        assert find_checkpoint(run) == (run, "step00000006")
        assert "using the newest complete one, step00000006" in capsys.readouterr().out
    for t in ("step00000006", "step00000003"):
        shutil.rmtree(run / t)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint is there"):
        find_checkpoint(run)
