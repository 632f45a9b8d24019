"""Benchmark: forward+backward of the KV-cached multi-pass latent forward vs the naive recompute vs no latents.

For each curriculum stage k = 0..max_stage: k reasoning steps are replaced by k * c_thought latents. Timed, per
stage, on the same batch:
  (a) cached  MMCoconut.forward        (n + 1 LM calls sharing a KV cache)
  (b) naive   MMCoconut.naive_forward  (n + 1 full-sequence LM calls)
  (c) plain   the same tokens with every latent replaced by an ordinary token (1 LM call)
Latent overhead = a / c. Times: min over interleaved repetitions (a/c med: ratio of medians).
Random weights, no download: GPT-2 124M (GPT2Config()) + CLIP ViT-B/32-sized vision tower (frozen, pooled image
token) on CUDA, batch 32; a small config and batch on CPU.

    python bench/bench_forward.py [--device cpu|cuda] [--batch N] [--reps N] [--dtype fp32|bf16|fp16]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcoconut.modeling.latent import MMCoconut  # noqa: E402
from mmcoconut.modeling.projector import build_projector  # noqa: E402
from mmcoconut.modeling.tokens import SpecialIds  # noqa: E402


def build(device, dtype, small: bool) -> MMCoconut:
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if small:
        lcfg = GPT2Config(vocab_size=8192, n_embd=256, n_layer=4, n_head=4, n_positions=512, bos_token_id=0,
                          eos_token_id=0)
        vcfg = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                image_size=64, patch_size=32)
    else:
        lcfg = GPT2Config(vocab_size=50262)  # gpt2 + 4 mmcoconut tokens + pad
        vcfg = CLIPVisionConfig(image_size=224, patch_size=32)  # ViT-B/32
    lcfg.attn_pdrop = lcfg.resid_pdrop = lcfg.embd_pdrop = 0.0  # identical work in all three variants
    V = lcfg.vocab_size
    ids = SpecialIds(image=V - 5, start=V - 4, latent=V - 3, end=V - 2, pad=V - 1, eos=0)
    lm, vision = GPT2LMHeadModel(lcfg), CLIPVisionModel(vcfg).requires_grad_(False)
    model = MMCoconut(lm, vision, build_projector("mlp2x_gelu", vcfg.hidden_size, lcfg.n_embd), ids, 1)
    return model.to(device=device, dtype=dtype).train()


def make_batch(model, B, stage, c_thought, q_len, step_len, n_steps, ans_len, device, image_size):
    """Rows: <image> question START latents END remaining steps answer EOS (same layout in every row)."""
    ids, V = model.ids, model.lm.config.vocab_size
    g = torch.Generator().manual_seed(stage)
    rnd = lambda n: torch.randint(1, V - 5, (B, n), generator=g)  # noqa: E731
    parts = [torch.full((B, 1), ids.image), rnd(q_len), torch.full((B, 1), ids.start),
             torch.full((B, stage * c_thought), ids.latent), torch.full((B, 1), ids.end),
             rnd(step_len * (n_steps - stage) + ans_len), torch.full((B, 1), ids.eos)]
    input_ids = torch.cat(parts, 1)
    labels = input_ids.clone()
    labels[:, : q_len + 3 + stage * c_thought] = -100
    mask = torch.ones_like(input_ids)
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
             "position_ids": torch.arange(input_ids.shape[1]).expand(B, -1).contiguous(),
             "pixel_values": torch.randn(B, 3, image_size, image_size, generator=g)}
    plain = dict(batch, input_ids=input_ids.masked_fill(input_ids == ids.latent, 7))
    mv = lambda b: {k: v.to(device) for k, v in b.items()}  # noqa: E731
    return mv(batch), mv(plain)


def timed(fns, reps, device):
    """min and median ms of forward+backward for each (fn, batch), interleaved (robust to a busy machine)."""
    def once(fn, batch):
        fn(**batch).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    times, peaks = [[] for _ in fns], []
    for fn, batch in fns:  # warm-up + peak memory of each variant
        once(fn, batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            once(fn, batch)
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
    for _ in range(reps):
        for i, (fn, batch) in enumerate(fns):
            t0 = time.perf_counter()
            once(fn, batch)
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [min(t) for t in times], [statistics.median(t) for t in times], peaks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on cuda, 8 on cpu")
    ap.add_argument("--reps", type=int, default=None, help="default: 10 on cuda, 5 on cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--c-thought", type=int, default=2)
    ap.add_argument("--max-stage", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    B, reps = args.batch or (32 if cuda else 8), args.reps or (10 if cuda else 5)
    model = build(device, dtype, small=not cuda)
    image_size = model.vision.config.image_size
    # ~ GSM8k-like layout: question 48, 4 steps of 16 tokens, answer 6 (stage 0 total ~124 + markers)
    q_len, step_len, n_steps, ans_len = 48, 16, max(args.max_stage + 1, 4), 6
    cfg = model.lm.config
    print(f"device={device} dtype={args.dtype} batch={B} reps={reps} threads={torch.get_num_threads()} "
          f"lm=n_embd {cfg.n_embd} n_layer {cfg.n_layer} vocab {cfg.vocab_size} c_thought={args.c_thought}")
    print(f"{'stage':>5} {'latents':>7} {'T':>4} {'passes':>6} {'cached ms':>10} {'naive ms':>9} {'plain ms':>9} "
          f"{'a/c':>6} {'b/c':>6} {'b/a':>6}  {'a/c med':>8}" + (" peak GiB a/b/c" if cuda else ""))
    for stage in range(args.max_stage + 1):
        batch, plain = make_batch(model, B, stage, args.c_thought, q_len, step_len, n_steps, ans_len, device,
                                  image_size)
        (a, b, c), med, peaks = timed([(model.forward, batch), (model.naive_forward, batch),
                                       (model.forward, plain)], reps, device)
        n = stage * args.c_thought
        print(f"{stage:>5} {n:>7} {batch['input_ids'].shape[1]:>4} {n + 1:>6} {a:>10.1f} {b:>9.1f} {c:>9.1f} "
              f"{a / c:>6.2f} {b / c:>6.2f} {b / a:>6.2f}  {med[0] / med[2]:>8.2f}"
              + (" {:.2f}/{:.2f}/{:.2f}".format(*peaks) if cuda else ""))
        model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
