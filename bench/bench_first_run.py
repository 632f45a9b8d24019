#!/usr/bin/env python
"""Time-to-first-step of a 2-rank CPU run (the demo config on given tiny models/shards), with empty or warm
extension caches: launch -> deepspeed.init_distributed -> deepspeed.initialize -> first optimizer step, then
the median step time of the following steps. Run it for any checkout with --code (e.g. an older commit
unpacked by `git archive`).

  python bench/bench_first_run.py --models /tmp/m --shards /tmp/s --cache /tmp/c [--warm] [--aot] [--code DIR]
      [--steps 20] [--env KEY=VALUE ...] [--ds-config ds_configs/zero2_2gpu.json] [-- extra overrides]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _built(cache: Path) -> list[str]:
    """Extension build products (.so) under the cache, relative paths."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*.so"))


def run_once(a, extra: list[str]) -> dict:
    cache = Path(a.cache)
    if not a.warm and cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-first-run-"))
    env = dict(os.environ, PYTHONPATH=str(Path(a.code).resolve()), MMCOCONUT_EXT_DIR=str(cache / "ext"),
               TORCH_EXTENSIONS_DIR=str(cache / "torch_ext"), DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1", MMCOCONUT_TEST_FAULTS=f"stop_after_steps={a.steps}", BENCH_OUT=str(work / "out"))
    env.update(kv.split("=", 1) for kv in a.env)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()),
           str(HERE / "first_run_rank.py"), "demo", "--deepspeed", a.ds_config,
           f"--model.lm_id={a.models}/lm", f"--model.vision_id={a.models}/vision",
           f"--data.train_shards={a.shards}/train", f"--data.val_shards={a.shards}/val",
           f"--logging.run_dir={work / 'run'}", "--logging.report_to=none", "--eval.val_every_epoch=false",
           "--train.num_epochs=1", "--checkpoint.resume=none", *extra]
    aot_s = None
    if a.aot:  # what `make install` does: build the injection op into the (fresh) cache before the run
        t = time.time()
        subprocess.run([sys.executable, "-c", "from mmcoconut.kernels.build import load_extension as L; L('cpu')"],
                       env=env, cwd=a.code, check=True, capture_output=True, timeout=a.timeout)
        aot_s = round(time.time() - t, 1)
    env["BENCH_T0"] = repr(time.time())
    t0 = time.time()
    p = subprocess.run(cmd, cwd=a.code, env=env, capture_output=True, text=True, timeout=a.timeout)
    wall = time.time() - t0
    recs = {}
    for f in (work / "out").glob("rank*.json"):
        r = json.loads(f.read_text())
        recs[r["rank"]] = r
    if p.returncode != 0 or 0 not in recs:
        print(p.stdout[-3000:], p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"run failed (rc {p.returncode})")
    r0 = recs[0]
    steps = r0["steps"]
    gaps = [b - a_ for a_, b in zip(steps, steps[1:])]
    res = {"aot_inject_build_s": aot_s, "wall_s": round(wall, 1), "init_distributed_s": r0.get("init_distributed_s"),
           "initialize_s": r0.get("initialize_s"), "initialize_done_at": r0.get("initialize_s_done_at"),
           "first_step_at": steps[0] if steps else None, "steps": len(steps),
           "median_step_s": round(statistics.median(gaps), 4) if gaps else None,
           "min_step_s": round(min(gaps), 4) if gaps else None, "shm_comm_op": r0.get("shm_comm_op"),
           "inference_all_reduce_calls": r0.get("inference_all_reduce_calls"),
           "optimizer": r0.get("optimizer"), "built": _built(cache),
           "first_run_lines": [ln for ln in (p.stdout + p.stderr).splitlines() if "first run only" in ln]}
    shutil.rmtree(work, ignore_errors=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", default=str(HERE.parent), help="checkout whose mmcoconut is timed")
    ap.add_argument("--models", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--cache", required=True, help="extension cache root (emptied first unless --warm)")
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--aot", action="store_true", help="build the injection op before the run (as make install)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ds-config", default="ds_configs/zero2_2gpu.json")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--label", default="")
    ap.add_argument("--timeout", type=int, default=1800)
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    load = os.getloadavg()[0]
    res = run_once(a, extra)
    res.update(label=a.label, warm=a.warm, load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
