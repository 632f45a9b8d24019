"""Benchmark: the loss's memory at GPT-2 124M (random weights, vocab 50262) + a tiny frozen CLIP tower (1 pooled
image token), the [B, T, V]-logits formula (loss.full_logits_loss on model(...).logits: the loss before issue 25)
vs the label-only chunked loss (model(..., return_logits=False): modeling/loss.py), on the same batches.

Rows (bench_hotpath.make_batch): <image> + 40 question + START + n latents + END + 20 answer tokens, labels on the
20 answer tokens (T = 63 + n; 20 of T - 1 positions projected).
  saved  bytes autograd keeps for backward during the forward (mmcoconut.testing.saved_activation_bytes;
         parameters excluded)
  rss    peak resident-set growth of the process during one forward+backward (Linux VmHWM reset through
         /proc/self/clear_refs after malloc_trim), the loss kept alive; old and new alternate, --reps each, median
  logits the fp32 [B, T, V] logits tensor the old formula makes (arithmetic)

    python bench/bench_loss.py [--batch 8,32] [--n 6] [--reps 2] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import bench_hotpath as H  # noqa: E402
import mmcoconut.kernels  # noqa: E402,F401  (the fused embedding op, as in training)
from mmcoconut.modeling.loss import full_logits_loss  # noqa: E402
from mmcoconut.testing import saved_activation_bytes  # noqa: E402

MIB = 2 ** 20


def old_loss(model, b):
    return full_logits_loss(model(**dict(b, labels=None, return_logits=True)).logits, b["labels"])


def new_loss(model, b):
    return model(**dict(b, return_logits=False)).loss


def fwd_bwd(fn, model, b):
    def run():
        model.zero_grad(set_to_none=True)
        loss = fn(model, b)
        loss.backward()
        return loss
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", default="8,32")
    ap.add_argument("--n", type=int, default=6, help="latents per row (stage 3 x c_thought 2)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = H.build(False)
    params = list(model.parameters())
    V = model.lm.config.vocab_size
    print(f"# bench_loss: GPT-2 124M (vocab {V}), torch {torch.__version__}, threads {torch.get_num_threads()}",
          flush=True)
    for B in (int(x) for x in args.batch.split(",")):
        b = H.make_batch(model, B, args.n, seed=4)
        T = b["input_ids"].shape[1]
        res = {"batch": B, "T": T, "labelled_positions": int(b["latent_plan"].label_index.numel()),
               "logits_fp32_MiB": round(B * T * V * 4 / MIB, 1)}
        with torch.no_grad():
            losses = {"old": float(old_loss(model, b)), "new": float(new_loss(model, b))}  # warm-up too
        res["loss_rel_diff"] = abs(losses["new"] - losses["old"]) / losses["old"]
        for name, fn in (("old", old_loss), ("new", new_loss)):
            _, nbytes = saved_activation_bytes(lambda: fn(model, b), exclude=params)
            res[f"saved_MiB_{name}"] = round(nbytes / MIB, 1)
        peaks = {"old": [], "new": []}
        for _ in range(args.reps):
            for name, fn in (("old", old_loss), ("new", new_loss)):
                peaks[name].append(H.measure_rss(fwd_bwd(fn, model, b))[0])
        for name in peaks:
            res[f"rss_peak_MiB_{name}"] = statistics.median(peaks[name])
        res["saved_MiB_less"] = round(res["saved_MiB_old"] - res["saved_MiB_new"], 1)
        res["rss_peak_MiB_less"] = round(res["rss_peak_MiB_old"] - res["rss_peak_MiB_new"], 1)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
