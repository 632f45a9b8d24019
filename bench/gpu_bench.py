"""Training-step throughput of MMCoconut without DeepSpeed (plain torch AdamW + autocast, GradScaler for fp16):
samples/s, MFU, a/c and peak memory at curriculum stages 0 and 3, eager or compiled, bf16 or fp16; checks first.

Real GPT-2 124M + CLIP ViT-B/32 configs with random weights (no hub) and dropout 0 (eager and compiled compute the
same function), A-OKVQA-like rows: 49 patch image tokens + 48 question tokens + START + 2*stage latents + END +
(4 - stage) rationale steps of 16 tokens + 6 answer + EOS. The training forward of the trainer: the Collator's plan
with the labelled positions, return_logits=False (the label-only loss). `--device cpu` runs a tiny model end to end
(bench/gpu_check.sh --dry-run).

  sync     (--checks sync) forward+backward of one micro-batch under torch.cuda.set_sync_debug_mode("error")
           (CUDA: a device->host sync raises) and the mmcoconut host-read probe; a failure is reported (first line
           of the error) and the benchmark goes on
  train    samples/s (median step), model TFLOP/s, MFU against --peak-tflops, peak GiB per configuration; with
           --ac, a/c = step time of the latent batch / step time of the same tokens with the latents as plain
           tokens (one LM call), same configuration
  compare  (--checks compiled, compiled mode) before the timed steps, on the same batch and weights: compiled vs
           eager loss and gradient (relative difference of the global gradient norms and max-abs over the norm)

    python bench/gpu_bench.py [--device cuda|cpu] [--batch 64] [--steps 8] [--stages 0,3] [--dtypes bf16,fp16]
                              [--modes eager,compiled] [--checks sync,compiled] [--ac] [--peak-tflops 989]
                              [--compile-backend inductor]
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
import mmcoconut.kernels  # noqa: E402,F401  (the fused embedding op, as in training)
from mmcoconut.modeling.latent import MMCoconut  # noqa: E402
from mmcoconut.modeling.pass_plan import plan_batch  # noqa: E402
from mmcoconut.modeling.projector import build_projector  # noqa: E402
from mmcoconut.modeling.tokens import SpecialIds  # noqa: E402
from mmcoconut.testing import HostSyncCounter  # noqa: E402

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
    lcfg.resid_pdrop = lcfg.embd_pdrop = lcfg.attn_pdrop = 0.0
    V = lcfg.vocab_size
    ids = SpecialIds(image=V - 5, start=V - 4, latent=V - 3, end=V - 2, pad=V - 1, eos=0)
    n_img = (vcfg.image_size // vcfg.patch_size) ** 2
    model = MMCoconut(GPT2LMHeadModel(lcfg), CLIPVisionModel(vcfg).requires_grad_(False),
                      build_projector("mlp2x_gelu", vcfg.hidden_size, lcfg.n_embd), ids, n_img,
                      image_tokens="patches", vision_layer=-2)
    return model.to(device).train()


def make_batch(model, B: int, stage: int, device, seed: int = 0, tiny: bool = False, plain: bool = False) -> dict:
    """A training batch as the Collator makes it (plan with labelled positions); plain: latents as plain tokens."""
    ids, V = model.ids, model.lm.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(1, V - 5, (B, n), generator=g)  # noqa: E731
    q, step, ans = (12, 4, 3) if tiny else (48, 16, 6)
    parts = [torch.full((B, model.n_image_tokens), ids.image), rnd(q), torch.full((B, 1), ids.start),
             torch.full((B, 2 * stage), 7 if plain else ids.latent), torch.full((B, 1), ids.end),
             rnd(step * (4 - stage) + ans), torch.full((B, 1), ids.eos)]
    input_ids = torch.cat(parts, 1)
    labels = input_ids.clone()
    labels[:, : model.n_image_tokens + q + 2 + 2 * stage] = -100
    size = model.vision.config.image_size
    b = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
         "position_ids": torch.arange(input_ids.shape[1]).expand(B, -1).contiguous(),
         "pixel_values": torch.randn(B, 3, size, size, generator=g),
         "latent_plan": plan_batch(input_ids, ids.latent, ids.image, labels=labels)}
    pin = device.type == "cuda"
    b = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in b.items()}
    return dict(b, return_logits=False)


def step_flops(model, b) -> float:
    """Model FLOPs of one training step: 6 x (LM matmul params; lm_head on the labelled positions only) per token
    + attention (12 L T^2 D per sequence, fwd+bwd) + the frozen vision tower's forward (2 x params per patch)."""
    cfg = model.lm.config
    B, T = b["input_ids"].shape
    head = model.lm.get_output_embeddings().weight.numel()
    body = sum(p.numel() for n, p in model.lm.transformer.named_parameters() if p.dim() == 2 and "wte" not in n
               and "wpe" not in n)
    proj = sum(p.numel() for p in model.projector.parameters())
    vis = sum(p.numel() for p in model.vision.parameters())
    v_tokens = (model.vision.config.image_size // model.vision.config.patch_size) ** 2 + 1
    labelled = int(b["latent_plan"].label_index.numel())
    return (6 * (body + proj) * B * T + 6 * head * labelled + 12 * cfg.n_layer * B * T * T * cfg.n_embd
            + 2 * vis * B * v_tokens)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def check_sync(model, device, dtype, tiny) -> dict:
    """No device->host sync in an eager forward+backward (CUDA sync-debug mode + the probe). Never raises."""
    b = make_batch(model, 4, 3, device, seed=7, tiny=tiny)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.disable_compile()
    with amp:
        model(**b).loss.backward()  # warm-up: extension load, lazy init
    sync(device)
    res = {"cuda_sync_debug": "n/a (not CUDA)"}
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            with amp:
                model(**b).loss.backward()
            sync(device)
            res["cuda_sync_debug"] = "passed (error mode: no synchronising call)"
        except Exception as e:  # noqa: BLE001 - reported, the benchmark goes on
            res["cuda_sync_debug"] = "FAILED " + first_line(e)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    try:
        with HostSyncCounter() as c, amp:
            model(**b).loss.backward()
        res["host_reads"] = c.total
        res["host_read_ops"] = dict(c.counts)
    except Exception as e:  # noqa: BLE001
        res["host_reads"] = "FAILED " + first_line(e)
    model.zero_grad(set_to_none=True)
    return res


def compare_compiled(model, b, dtype, backend) -> dict:
    """Compiled vs eager forward+backward on one batch and the same weights (no optimizer step in between)."""
    amp = torch.autocast(b["input_ids"].device.type, dtype=dtype, enabled=dtype != torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    runs = []
    for compiled in (False, True):
        model.enable_compile(backend=backend) if compiled else model.disable_compile()
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with amp:
            loss = model(**b).loss
        loss.backward()
        sync(b["input_ids"].device)
        grads = torch.cat([p.grad.float().flatten() for p in params if p.grad is not None])
        runs.append((loss.detach().item(), grads, time.perf_counter() - t0))
    (le, ge, _), (lc, gc, tc) = runs
    model.zero_grad(set_to_none=True)
    return {"loss_eager": round(le, 6), "loss_compiled": round(lc, 6), "loss_rel_diff": abs(lc - le) / abs(le),
            "grad_norm_rel_diff": float((gc.norm() - ge.norm()).abs() / ge.norm()),
            "grad_max_abs_diff_over_norm": float((gc - ge).abs().max() / ge.norm()),
            "first_compiled_step_s": round(tc, 1)}


def timed_steps(model, opt, scaler, batches, dtype, steps, warmup, device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
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
    return times


def train_run(model, device, dtype, stage, B, steps, warmup, compiled, tiny, compare, ac, backend) -> dict:
    res = {}
    batches = [make_batch(model, B, stage, device, seed=s, tiny=tiny) for s in range(2)]
    if compiled and compare:
        try:
            res["compare"] = compare_compiled(model, batches[0], dtype, backend)
        except Exception as e:  # noqa: BLE001 - reported, the timing goes on
            res["compare"] = {"error": first_line(e)}
    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    model.enable_compile(backend=backend) if compiled else model.disable_compile()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = statistics.median(timed_steps(model, opt, scaler, batches, dtype, steps, warmup, device))
    if ac and stage > 0:  # the same tokens, latents as plain tokens: one LM call per step
        plain = [make_batch(model, B, stage, device, seed=s, tiny=tiny, plain=True) for s in range(2)]
        res["a/c"] = round(dt / statistics.median(timed_steps(model, opt, scaler, plain, dtype, steps, warmup,
                                                                device)), 2)
    model.disable_compile()
    flops = step_flops(model, batches[0])
    res.update({"samples_per_s": round(B / dt, 1), "step_ms": round(1e3 * dt, 2),
                "tflops": round(flops / dt / 1e12, 3), "T": batches[0]["input_ids"].shape[1],
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None})
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on cuda, 2 on cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8 cuda, 2 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 cuda (compile), 1 cpu")
    ap.add_argument("--stages", default="0,3")
    ap.add_argument("--dtypes", default="bf16", help="bf16 (the default on Ampere/Hopper), fp16, fp32")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--checks", default="sync,compiled", help="sync: sync-debug check; compiled: compiled vs "
                    "eager loss before each compiled configuration; empty: none")
    ap.add_argument("--ac", action="store_true", help="also time the plain-token batch: a/c at stages > 0")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16/bf16 peak (H100/H200 SXM: 989)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tiny = not cuda
    B = args.batch or (64 if cuda else 2)
    steps, warmup = args.steps or (8 if cuda else 2), args.warmup or (3 if cuda else 1)
    dtypes, checks = args.dtypes.split(","), set(filter(None, args.checks.split(",")))
    model = build(device, tiny)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"# gpu_bench: {name}, torch {torch.__version__}, batch {B}, {'tiny' if tiny else 'GPT-2 124M + CLIP B/32'}"
          f" (random weights), peak {args.peak_tflops} TFLOP/s, injection {mmcoconut.kernels.backend_for(device)}",
          flush=True)
    if "sync" in checks:
        print("check " + json.dumps(check_sync(model, device, DTYPES[dtypes[0]], tiny)), flush=True)
    print("| stage | dtype | mode | T | samples/s | step ms | TFLOP/s | MFU | a/c | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    failed = 0
    for stage in (int(s) for s in args.stages.split(",")):
        for dname in dtypes:
            for mode in args.modes.split(","):
                try:
                    r = train_run(model, device, DTYPES[dname], stage, B, steps, warmup, mode == "compiled", tiny,
                                  "compiled" in checks, args.ac, args.compile_backend)
                except Exception as e:  # noqa: BLE001 - one configuration failing does not end the others
                    failed += 1
                    print(f"| {stage} | {dname} | {mode} | FAILED {first_line(e)} |", flush=True)
                    model.disable_compile()
                    continue
                if "compare" in r:
                    print(f"compare stage {stage} {dname} " + json.dumps(r["compare"]), flush=True)
                print(f"| {stage} | {dname} | {mode} | {r['T']} | {r['samples_per_s']} | {r['step_ms']} "
                      f"| {r['tflops']} | {100 * r['tflops'] / args.peak_tflops:.1f} % | {r.get('a/c', '-')} "
                      f"| {r['peak_gib']} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
