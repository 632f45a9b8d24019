"""A window with a NaN loss is skipped by each engine: DeepSpeed in every ZeRO stage x precision (engines/deepspeed.py),
FSDP2 in every precision (engines/fsdp.py).

One subprocess per engine (world 1, gloo) builds a small engine per combination and drives it with the trainer's
own window code (StepSync + the engine's backward_accumulate / finish_window): a good step, a window whose second
micro-batch loss is NaN, another good step (DeepSpeed also bf16 with check_grad_overflow=false, which
prepare_ds_config turns back on). The bad window must leave every parameter bitwise unchanged, count one skipped
step and advance global_steps; the following good step must change the parameters and keep them finite.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMON = r'''
import json, os, sys
import torch
from mmcoconut.train.engines.base import EngineSpec
from mmcoconut.train.step import StepSync


def drive(eng, params):
    """good window, NaN window, good window -> what the NaN window did and what the next one did"""
    sync = StepSync(eng.device, 1, lag=0 if eng.host_decides_skip else 1)
    g = torch.Generator().manual_seed(1)

    def window(nan_at=None):
        sync.begin()
        for i in range(2):
            x = torch.randn(4, 8, generator=g).to(eng.dtype)
            loss = eng.forward({"input": x}).float().pow(2).mean()
            if i == nan_at:
                loss = loss * float("nan")
            sync.add(loss, 4, torch.ones(4, 3))
            if i == 0:
                eng.backward_accumulate(loss)
                continue
            eng.finish_window(sync, sync.reduce(False, False, {}), loss)

    window()
    p0, skipped0, steps0 = params(), eng.skipped_steps, eng.global_steps
    window(nan_at=1)
    p1 = params()
    same = all(torch.equal(a, b) for a, b in zip(p0, p1))
    skipped, steps = eng.skipped_steps - skipped0, eng.global_steps - steps0
    window()
    p2 = params()
    moved = any(not torch.equal(a, b) for a, b in zip(p1, p2))
    finite = all(torch.isfinite(p).all().item() for p in p2)
    return dict(same=same, skipped=skipped, steps=steps, moved=moved, finite=finite)


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
'''

SCRIPTS = {"deepspeed": COMMON + r'''
from mmcoconut.train.engines import ds_ops
from mmcoconut.train.engines.deepspeed import DeepSpeedEngine
from mmcoconut.train.engines.ds_config import _check_device_support

ds_ops.init_distributed()  # the trainer's path: gloo, no DeepSpeed op compiled on CPU
results = {}
combos = [(z, p, None) for z in (0, 1, 2, 3) for p in ("fp32", "fp16", "bf16")] + [(2, "bf16", False)]
for zero, prec, check in combos:  # check: bf16.check_grad_overflow as a user might set it (forced back on)
    ds = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
          "gradient_clipping": 1.0, "zero_optimization": {"stage": zero}, "steps_per_print": 10 ** 9,
          "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": 8, "hysteresis": 2},
          "bf16": {"enabled": prec == "bf16", **({} if check is None else {"check_grad_overflow": check})}}
    _check_device_support(ds, "test")
    ds_ops.cpu_defaults(ds)  # the trainer's CPU optimizer: torch's fused AdamW, nothing to compile
    eng = DeepSpeedEngine(EngineSpec("deepspeed", 1, 4, 2, prec, zero, ds)).wrap(small_model(), None)

    def params():
        return [(p.ds_tensor if hasattr(p, "ds_tensor") else p.data).detach().float().clone()
                for p in eng.module.parameters()]

    name = f"zero{zero}-{prec}" + ("" if check is None else f"-check{check}")
    results[name] = dict(drive(eng, params), mode=eng.mode, optimizer=type(eng.ds.optimizer).__name__)
    del eng
print("RESULTS " + json.dumps(results))
''', "fsdp2": COMMON + r'''
from mmcoconut.config import load_config
from mmcoconut.train.engines import create_engine, init_distributed
from mmcoconut.train.engines.fsdp_config import fsdp_spec
from mmcoconut.train.schedule import make_scheduler_factory

results = {}
for prec in ("fp32", "bf16", "fp16"):
    cfg = load_config(data={"train": {"engine": "fsdp2", "precision": prec, "lr": 1e-2, "micro_batch_size": 4,
                                      "gradient_accumulation_steps": 2, "initial_scale_power": 8}})
    spec = fsdp_spec(cfg, 1)
    if not torch.distributed.is_initialized():
        init_distributed(spec)
    eng = create_engine(spec, cfg).wrap(small_model(), make_scheduler_factory(cfg.train, 100))

    def params():
        return [p.full_tensor().detach().float().clone() for p in eng.module.parameters()]

    scale = eng.loss_scale()
    results[prec] = dict(drive(eng, params), scale=[scale, eng.loss_scale()])
print("RESULTS " + json.dumps(results))
'''}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_nan_window_is_skipped_in_every_configuration(engine):
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), DS_ACCELERATOR="cpu", MMCOCONUT_CPU_FP16="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", SCRIPTS[engine]], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert r.returncode == 0 and line, (r.stdout[-3000:], r.stderr[-3000:])
    res = json.loads(line[0][len("RESULTS "):])
    assert len(res) == (13 if engine == "deepspeed" else 3)
    for combo, v in res.items():
        assert v["same"] and v["skipped"] == 1 and v["steps"] == 1, (combo, v)
        assert v["moved"] and v["finite"], (combo, v)
    if engine == "deepspeed":
        assert res["zero0-fp32"]["mode"] == "host" and res["zero2-fp32"]["mode"] == "device"
        assert res["zero0-fp16"]["optimizer"] == "FP16_UnfusedOptimizer"  # torch's AdamW (the CPU default) in fp16
    else:  # fp16: the skipped window backs the loss scale off, as DeepSpeed's overflow path does
        assert res["fp16"]["scale"] == [256.0, 128.0] and res["fp32"]["scale"] == [None, None], res
