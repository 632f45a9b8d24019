#!/usr/bin/env python
"""Optimizer step on CPU: torch.optim.AdamW (what "torch_adam": true gives; default for-loop and fused=True) vs
DeepSpeed's CPU FusedAdam (a JIT compile on first use), on one flat fp32 partition as ZeRO-1/2 hands it over (one
tensor per rank), 1 thread.

  TORCH_EXTENSIONS_DIR=<dir with fused_adam built or empty> python bench/bench_cpu_adam.py [--sizes 580800 62000000]
Prints one JSON line per size: min and median seconds per step over --repeats steps, and the max |difference|
of the parameters after them (same gradients)."""
import argparse
import json
import statistics
import time

import torch


def timed_steps(opt, p, grads):
    times = []
    for g in grads:
        p.grad = g
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[580_800, 62_000_000],
                    help="parameters per rank (default: the demo model's 1.16 M / 2 ranks; GPT-2 124 M / 2)")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from deepspeed.ops.adam import FusedAdam

    kw = dict(lr=4e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for n in a.sizes:
        g = torch.Generator().manual_seed(0)
        init = torch.randn(n, generator=g)
        grads = [torch.randn(n, generator=g) * 1e-2 for _ in range(4)]
        grads = [grads[i % 4] for i in range(a.repeats)]
        res = {"params": n}
        finals = {}
        for name, make in (("torch_adamw", lambda p: torch.optim.AdamW([p], **kw)),
                           ("torch_adamw_fused", lambda p: torch.optim.AdamW([p], fused=True, **kw)),
                           ("ds_fused_adam", lambda p: FusedAdam([p], adam_w_mode=True, **kw))):
            p = torch.nn.Parameter(init.clone())
            opt = make(p)
            timed_steps(opt, p, grads[:2])  # warm-up (and the one-time op load)
            t = timed_steps(opt, p, grads)
            res[name] = {"min_s": round(min(t), 5), "median_s": round(statistics.median(t), 5)}
            finals[name] = p.detach()
        res["max_abs_diff_vs_torch_adamw"] = {k: float((finals["torch_adamw"] - v).abs().max())
                                              for k, v in finals.items() if k != "torch_adamw"}
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
