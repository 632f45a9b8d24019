"""A window with a NaN loss is skipped through DeepSpeed in every ZeRO stage x precision (nonfinite.py).

One subprocess (world 1, gloo) builds a small engine per combination and drives it with the loop's own window
code (StepSync + nonfinite.finish_window): a good step, a window whose second micro-batch loss is NaN, another
good step (plus bf16 with check_grad_overflow=false, which prepare_ds_config turns back on). The bad window
must leave every parameter bitwise unchanged, count one skipped step and advance
global_steps; the following good step must change the parameters and keep them finite.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import json, os, sys
import torch, deepspeed
from mmcoconut.train import ds_ops
from mmcoconut.train.engine import _check_device_support
from mmcoconut.train.nonfinite import finish_window, prepare_ds_config, skip_mode
from mmcoconut.train.stepsync import StepSync

ds_ops.init_distributed()  # the trainer's path: gloo, no DeepSpeed op compiled on CPU
results = {}
combos = [(z, p, None) for z in (0, 1, 2, 3) for p in ("fp32", "fp16", "bf16")] + [(2, "bf16", False)]
for zero, prec, check in combos:  # check: bf16.check_grad_overflow as a user might set it (forced back on)
    if True:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
              "gradient_clipping": 1.0, "zero_optimization": {"stage": zero}, "steps_per_print": 10 ** 9,
              "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 2},
              "bf16": {"enabled": prec == "bf16", **({} if check is None else {"check_grad_overflow": check})}}
        _check_device_support(ds, "test")
        ds_ops.cpu_defaults(ds)  # the trainer's CPU optimizer: torch's fused AdamW, nothing to compile
        prepare_ds_config(ds)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        mode = skip_mode(engine)
        dtype = next(engine.module.parameters()).dtype
        sync = StepSync(engine.device, 1, lag=0 if mode == "host" else 1)
        g = torch.Generator().manual_seed(1)

        def params():
            return [(p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach().float().clone()
                    for p in engine.module.parameters()]

        def window(nan_at=None):
            sync.begin()
            for i in range(2):
                x = torch.randn(4, 8, generator=g).to(dtype)
                loss = engine(x).float().pow(2).mean()
                if i == nan_at:
                    loss = loss * float("nan")
                sync.add(loss, 4, torch.ones(4, 3))
                if i == 0:
                    engine.backward(loss)
                    engine.step()
                    continue
                vec = sync.reduce(False, False, {})
                finish_window(engine, mode, sync, vec, loss)

        window()
        p0, skipped0, steps0 = params(), engine.skipped_steps, engine.global_steps
        window(nan_at=1)
        p1 = params()
        same = all(torch.equal(a, b) for a, b in zip(p0, p1))
        skipped, steps = engine.skipped_steps - skipped0, engine.global_steps - steps0
        window()
        p2 = params()
        moved = any(not torch.equal(a, b) for a, b in zip(p1, p2))
        finite = all(torch.isfinite(p).all().item() for p in p2)
        name = f"zero{zero}-{prec}" + ("" if check is None else f"-check{check}")
        results[name] = dict(mode=mode, optimizer=type(engine.optimizer).__name__, same=same, skipped=skipped,
                             steps=steps, moved=moved, finite=finite)
        del engine
print("RESULTS " + json.dumps(results))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
def test_nan_window_is_skipped_in_every_zero_stage_and_precision():
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu", MMCOCONUT_CPU_FP16="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert r.returncode == 0 and line, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(line[0][len("RESULTS "):])
    assert len(res) == 13
    for combo, v in res.items():
        assert v["same"] and v["skipped"] == 1 and v["steps"] == 1, (combo, v)
        assert v["moved"] and v["finite"], (combo, v)
    assert res["zero0-fp32"]["mode"] == "host" and res["zero2-fp32"]["mode"] == "device"
    assert res["zero0-fp16"]["optimizer"] == "FP16_UnfusedOptimizer"  # torch's AdamW (the CPU default) under fp16
