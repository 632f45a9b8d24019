"""Rank-side timer for bench/bench_first_run.py (not for users): wraps deepspeed.init_distributed,
deepspeed.initialize and DeepSpeedEngine.step with wall-clock stamps, then runs `python -m mmcoconut.train`
unchanged. Writes $BENCH_OUT/rank<R>.json at exit (times in seconds since $BENCH_T0, the launch)."""
import atexit
import json
import os
import sys
import time

T0 = float(os.environ["BENCH_T0"])
REC = {"rank": int(os.environ.get("RANK", "0")), "steps": []}


def _stamp(key, start):
    REC[key] = round(time.time() - start, 3)
    REC[key + "_done_at"] = round(time.time() - T0, 3)


def _write():
    out = os.environ["BENCH_OUT"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{REC['rank']}.json"), "w") as f:
        json.dump(REC, f)


atexit.register(_write)
REC["python_start_at"] = round(time.time() - T0, 3)
import deepspeed  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

_init_dist, _initialize, _step = deepspeed.init_distributed, deepspeed.initialize, DeepSpeedEngine.step


def init_distributed(*a, **k):
    t = time.time()
    try:
        return _init_dist(*a, **k)
    finally:
        _stamp("init_distributed_s", t)
        from deepspeed.comm import comm as C
        REC["shm_comm_op"] = getattr(C.cdb, "shm_comm_op", None) is not None
        REC["inference_all_reduce_calls"] = 0  # the only DeepSpeed path that uses the shm comm op
        _iar = C.cdb.inference_all_reduce

        def counted(*a, **k):
            REC["inference_all_reduce_calls"] += 1
            return _iar(*a, **k)
        C.cdb.inference_all_reduce = counted


def initialize(*a, **k):
    t = time.time()
    try:
        return _initialize(*a, **k)
    finally:
        _stamp("initialize_s", t)
        REC["optimizer"] = None


def step(self, *a, **k):
    before = self.global_steps
    out = _step(self, *a, **k)
    if self.global_steps != before:
        REC["steps"].append(round(time.time() - T0, 4))
        if REC.get("optimizer") is None:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            REC["optimizer"] = f"{type(self.optimizer).__name__}/{type(inner).__name__}"
    return out


deepspeed.init_distributed, deepspeed.initialize, DeepSpeedEngine.step = init_distributed, initialize, step
REC["imports_done_at"] = round(time.time() - T0, 3)

from mmcoconut.cli.train import main  # noqa: E402

REC["rc"] = main(sys.argv[1:])
sys.exit(REC["rc"])
