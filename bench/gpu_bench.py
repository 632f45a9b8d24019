"""Training-step throughput of MMCoconut without DeepSpeed (plain torch AdamW + autocast, GradScaler for fp16):
samples/s, MFU and peak memory at curriculum stages 0 and 3, eager and compiled, fp16 and bf16; plus a sync check.

Real GPT-2 124M + CLIP ViT-B/32 configs with random weights (no hub), A-OKVQA-like rows: 49 patch image tokens +
48 question tokens + START + 2*stage latents + END + (4 - stage) rationale steps of 16 tokens + 6 answer + EOS.
`--device cpu` runs a tiny model end to end (the script's own smoke test).

  check    forward+backward of one micro-batch under torch.cuda.set_sync_debug_mode("error") (CUDA: any
           device->host sync raises) and the mmcoconut host-read probe; compiled loss == eager loss
  train    samples/s (median step), model TFLOP/s, MFU against --peak-tflops, peak GiB per configuration

    python bench/gpu_bench.py [--device cuda|cpu] [--batch 64] [--steps 8] [--stages 0,3] [--dtypes fp16,bf16]
                              [--modes eager,compiled] [--peak-tflops 989]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmcoconut.modeling.latent import MMCoconut  # noqa: E402
from mmcoconut.modeling.pass_plan import plan_batch  # noqa: E402
from mmcoconut.modeling.projector import build_projector  # noqa: E402
from mmcoconut.testing import HostSyncCounter  # noqa: E402
from mmcoconut.modeling.tokens import SpecialIds  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build(device, tiny: bool) -> MMCoconut:
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if tiny:
        lcfg = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=2, n_positions=256)
        vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=16)
    else:
        lcfg = GPT2Config(vocab_size=50262)  # gpt2 + mmcoconut's 5 added tokens
        vcfg = CLIPVisionConfig(image_size=224, patch_size=32)  # ViT-B/32
    V = lcfg.vocab_size
    ids = SpecialIds(image=V - 5, start=V - 4, latent=V - 3, end=V - 2, pad=V - 1, eos=0)
    n_img = (vcfg.image_size // vcfg.patch_size) ** 2
    model = MMCoconut(GPT2LMHeadModel(lcfg), CLIPVisionModel(vcfg).requires_grad_(False),
                      build_projector("mlp2x_gelu", vcfg.hidden_size, lcfg.n_embd), ids, n_img,
                      image_tokens="patches", vision_layer=-2)
    return model.to(device).train()


def make_batch(model, B: int, stage: int, device, seed: int = 0, tiny: bool = False) -> dict:
    ids, V = model.ids, model.lm.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(1, V - 5, (B, n), generator=g)  # noqa: E731
    q, step, ans = (12, 4, 3) if tiny else (48, 16, 6)
    parts = [torch.full((B, model.n_image_tokens), ids.image), rnd(q), torch.full((B, 1), ids.start),
             torch.full((B, 2 * stage), ids.latent), torch.full((B, 1), ids.end), rnd(step * (4 - stage) + ans),
             torch.full((B, 1), ids.eos)]
    input_ids = torch.cat(parts, 1)
    labels = input_ids.clone()
    labels[:, : model.n_image_tokens + q + 2 + 2 * stage] = -100
    size = model.vision.config.image_size
    b = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
         "position_ids": torch.arange(input_ids.shape[1]).expand(B, -1).contiguous(),
         "pixel_values": torch.randn(B, 3, size, size, generator=g),
         "latent_plan": plan_batch(input_ids, ids.latent, ids.image)}
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in b.items()}


def step_flops(model, b) -> float:
    """Model FLOPs of one training step: 6 x (LM matmul params incl. lm_head) per token + attention (12 L T^2 D
    per sequence, fwd+bwd) + the frozen vision tower's forward (2 x params per patch token)."""
    cfg = model.lm.config
    B, T = b["input_ids"].shape
    lm = sum(p.numel() for n, p in model.lm.named_parameters() if p.dim() == 2 and "wpe" not in n)
    proj = sum(p.numel() for p in model.projector.parameters())
    vis = sum(p.numel() for p in model.vision.parameters())
    v_tokens = (model.vision.config.image_size // model.vision.config.patch_size) ** 2 + 1
    return 6 * (lm + proj) * B * T + 12 * cfg.n_layer * B * T * T * cfg.n_embd + 2 * vis * B * v_tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def check(model, device, dtype, tiny, compiled: bool):
    """No device->host sync in forward+backward (CUDA sync-debug mode + the probe); compiled == eager loss."""
    b = make_batch(model, 4, 3, device, seed=7, tiny=tiny)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with amp:
        model(**b).loss.backward()  # warm-up: extension build, lazy init
    sync(device)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with HostSyncCounter() as c, amp:
            loss = model(**b).loss
            loss.backward()
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    res = {"host_reads": c.total, "cuda_sync_debug": "error mode passed" if device.type == "cuda" else "n/a",
           "loss_eager": loss.item()}
    if compiled:
        model.enable_compile()
        try:
            with amp:
                res["loss_compiled"] = model(**b).loss.item()
        finally:
            model.disable_compile()
        res["rel_diff"] = abs(res["loss_compiled"] - res["loss_eager"]) / abs(res["loss_eager"])
    return res


def train_run(model, device, dtype, stage, B, steps, warmup, compiled, tiny):
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model.enable_compile() if compiled else model.disable_compile()
    batches = [make_batch(model, B, stage, device, seed=s, tiny=tiny) for s in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        b = batches[i % 2]
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**b).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    model.disable_compile()
    dt = statistics.median(times)
    flops = step_flops(model, batches[0])
    return {"samples_per_s": round(B / dt, 1), "step_ms": round(1e3 * dt, 2), "tflops": round(flops / dt / 1e12, 2),
            "T": batches[0]["input_ids"].shape[1], "loss": round(float(loss), 4),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on cuda, 2 on cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8 cuda, 2 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 cuda (compile), 1 cpu")
    ap.add_argument("--stages", default="0,3")
    ap.add_argument("--dtypes", default=None, help="default fp16,bf16 on cuda, bf16 on cpu")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16/bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--check-compiled", action="store_true", help="also compare compiled vs eager loss (cuda)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tiny = not cuda
    B = args.batch or (64 if cuda else 2)
    steps, warmup = args.steps or (8 if cuda else 2), args.warmup or (3 if cuda else 1)
    dtypes = (args.dtypes or ("fp16,bf16" if cuda else "bf16")).split(",")
    model = build(device, tiny)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"# gpu_bench: {name}, torch {torch.__version__}, batch {B}, {'tiny' if tiny else 'GPT-2 124M + CLIP B/32'}"
          f" (random weights), peak {args.peak_tflops} TFLOP/s", flush=True)
    if not args.skip_check:
        print("check " + json.dumps(check(model, device, DTYPES[dtypes[0]], tiny, args.check_compiled or not cuda)),
              flush=True)
    print("| stage | dtype | mode | T | samples/s | step ms | TFLOP/s | MFU | peak GiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for stage in (int(s) for s in args.stages.split(",")):
        for dname in dtypes:
            for mode in args.modes.split(","):
                r = train_run(model, device, DTYPES[dname], stage, B, steps, warmup, mode == "compiled", tiny)
                print(f"| {stage} | {dname} | {mode} | {r['T']} | {r['samples_per_s']} | {r['step_ms']} "
                      f"| {r['tflops']} | {100 * r['tflops'] / args.peak_tflops:.1f} % | {r['peak_gib']} "
                      f"| {r['loss']} |", flush=True)


if __name__ == "__main__":
    main()
