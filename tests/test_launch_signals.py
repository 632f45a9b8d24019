"""launch.sh signal handling with DeepSpeed's real per-node launcher or real torchrun (train.engine=fsdp2) and
stand-in ranks (no model, seconds).

The stand-in runner starts `deepspeed.launcher.launch` (which, when signalled itself, SIGTERMs the ranks again and
SIGKILLs them 30 s later), or torchrun, with two ranks that use mmcoconut.train.signals like the trainer: on a stop
signal they "save" and exit 75; a second signal exits at once. launch.sh must deliver each signal to the ranks only,
pass the exit code through (torchrun reports any failing rank as 1: the ranks' own codes must win), kill everything
on a third signal, and leave no process behind.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNNER = r'''
import base64, json, os, subprocess, sys, time
open(os.path.join(os.environ["FAKE_OUT"], "runner.pid"), "w").write(str(os.getpid()))
time.sleep(float(os.environ.get("FAKE_RUNNER_DELAY", "0")))  # DeepSpeed's runner starting up (imports, ...)
info = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
p = subprocess.Popen([sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={info}",
                      "--master_addr=127.0.0.1", f"--master_port={os.environ['FAKE_PORT']}",
                      os.environ["FAKE_RANK"]])
open(os.path.join(os.environ["FAKE_OUT"], "launcher.pid"), "w").write(str(p.pid))
p.wait()  # like DeepSpeed's runner on one node: no signal handler, the launcher's exit code passes through
sys.exit(p.returncode if p.returncode > 0 else 0)
'''

TORCHRUN = r'''
import os, sys
open(os.path.join(os.environ["FAKE_OUT"], "launcher.pid"), "w").write(str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          os.environ["FAKE_PORT"], os.environ["FAKE_RANK"]])  # torchrun itself, launch.sh's child
'''

RANK = r'''
import os, signal, sys, time
from mmcoconut.train.signals import EXIT_STOPPED, record_exit_code, stop_request
out, rank = os.environ["FAKE_OUT"], os.environ["RANK"]
if os.environ.get("FAKE_IGNORE"):  # a rank stuck where no signal helps
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    open(f"{out}/rank{rank}.pid", "w").write(str(os.getpid()))
    while True:
        time.sleep(1)
req = stop_request()
open(f"{out}/rank{rank}.pid", "w").write(str(os.getpid()))
if os.environ.get("FAKE_EXIT"):  # training finished
    record_exit_code(int(os.environ["FAKE_EXIT"]))  # as mmcoconut/cli/train.py does
    sys.exit(int(os.environ["FAKE_EXIT"]))
while not req.requested:
    time.sleep(0.02)
open(f"{out}/rank{rank}.stop", "w").write(req.name)
time.sleep(float(os.environ.get("FAKE_SAVE_S", "1")))  # "finish the step and save a checkpoint"
record_exit_code(EXIT_STOPPED)
sys.exit(EXIT_STOPPED)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _env(tmp_path, out, engine="deepspeed", **env_extra):
    (tmp_path / "rank.py").write_text(RANK)
    for name, code in (("runner", RUNNER), ("torchrun", TORCHRUN)):
        (tmp_path / f"{name}.py").write_text(code)
        (tmp_path / f"{name}.sh").write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / name}.py \"$@\"\n")
        (tmp_path / f"{name}.sh").chmod(0o755)
    return dict(os.environ, NGPU="0", NPROC="2", CONFIG="unused", DS_CONFIG="unused", PYTHONPATH=str(ROOT),
                DEEPSPEED=str(tmp_path / "runner.sh"), TORCHRUN=str(tmp_path / "torchrun.sh"), ENGINE=engine,
                FAKE_OUT=str(out), FAKE_RANK=str(tmp_path / "rank.py"), FAKE_PORT=str(_free_port()),
                MMCOCONUT_SIGNAL_DEDUP_S="0.5", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **env_extra)


def _start(tmp_path, **env_extra):
    out = tmp_path / "out"
    out.mkdir()
    env = _env(tmp_path, out, **env_extra)
    # SIGINT as in a terminal: a suite started in the background (`nohup pytest &`) inherits SIGINT ignored, and
    # bash cannot trap a signal that was ignored when it started
    p = subprocess.Popen(["bash", str(ROOT / "launch.sh")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not all((out / f"rank{r}.pid").is_file() and (out / f"rank{r}.pid").read_text() for r in (0, 1)):
        assert time.time() < deadline and p.poll() is None, p.communicate()[0] if p.poll() is not None else "slow"
        time.sleep(0.1)
    time.sleep(0.3)  # the ranks are past stop_request() (pid file written after it)
    pids = [int((out / f"rank{r}.pid").read_text()) for r in (0, 1)] + [int((out / "launcher.pid").read_text())]
    return p, out, pids


def _finish(p, pids, timeout=60):
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.kill()
        pytest.fail(f"launch.sh did not finish: {p.communicate()[0][-3000:]}")
    time.sleep(0.5)
    assert not [pid for pid in pids if _alive(pid)], f"left behind: {pids}\n{log}"
    return log


@pytest.mark.parametrize("engine,sig", [("deepspeed", signal.SIGTERM), ("deepspeed", signal.SIGUSR1),
                                        ("fsdp2", signal.SIGTERM)])  # SIGINT: next test
def test_one_signal_reaches_the_ranks_once_and_75_comes_back(tmp_path, engine, sig):
    p, out, pids = _start(tmp_path, engine=engine)
    p.send_signal(sig)
    log = _finish(p, pids)
    assert p.returncode == 75, log  # under torchrun too, which itself exits 1 when a rank fails
    assert [(out / f"rank{r}.stop").read_text() for r in (0, 1)] == [sig.name] * 2, log
    assert "Main process received" not in log, log  # DeepSpeed's launcher itself was never signalled
    assert "death signal" not in log, log  # nor torchrun


def test_second_signal_exits_at_once(tmp_path):
    p, out, pids = _start(tmp_path, FAKE_SAVE_S="60")
    p.send_signal(signal.SIGINT)
    time.sleep(1.5)  # past the 0.5 s window in which repeats count as the same request
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    log = _finish(p, pids, timeout=30)
    assert p.returncode == 128 + signal.SIGINT, log
    assert time.time() - t0 < 20, log
    assert "second stop signal (SIGINT): exiting now without saving" in log


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_third_signal_kills_everything(tmp_path, engine):
    p, out, pids = _start(tmp_path, engine=engine, FAKE_IGNORE="1")
    for _ in range(3):
        p.send_signal(signal.SIGTERM)
        time.sleep(0.7)
    log = _finish(p, pids, timeout=30)
    assert p.returncode != 0 and "killing the whole launch" in log, log


@pytest.mark.parametrize("engine,code", [("deepspeed", 0), ("deepspeed", 3), ("fsdp2", 3)])
def test_exit_code_passes_through_without_signals(tmp_path, engine, code):
    out = tmp_path / "out"
    out.mkdir()
    r = subprocess.run(["bash", str(ROOT / "launch.sh")], cwd=ROOT,
                       env=_env(tmp_path, out, engine=engine, FAKE_EXIT=str(code)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == code, r.stdout + r.stderr
    assert "launch.sh: SIG" not in r.stderr and "+ " in r.stderr  # the command is shown, nothing forwarded


def test_signal_before_the_ranks_exist_says_nothing_was_saved(tmp_path):
    """Issue 26.10: a SIGTERM while DeepSpeed's runner is still starting (no rank yet) used to print "(they save a
    checkpoint and exit 75)" and exit 143 with nothing saved. launch.sh must say what happened."""
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen(["bash", str(ROOT / "launch.sh")], cwd=ROOT, env=_env(tmp_path, out, FAKE_RUNNER_DELAY="60"),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not ((out / "runner.pid").is_file() and (out / "runner.pid").read_text()):
        assert time.time() < deadline and p.poll() is None, "runner did not start"
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    log = _finish(p, [int((out / "runner.pid").read_text())], timeout=30)
    assert p.returncode == 128 + signal.SIGTERM, log
    assert "launch.sh: SIGTERM before any training process started: stopping the launch" in log, log
    assert "stopped by SIGTERM before training started: nothing was trained or saved by this launch" in log, log
    assert "save a checkpoint and exit 75" not in log and not list(out.glob("rank*.pid")), log
