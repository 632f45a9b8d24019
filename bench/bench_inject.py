"""Benchmark: fused inject_embeddings vs the PyTorch path it replaces (forward and forward+backward).

Naive path (what a model would write): embedding lookup -> clone -> index_put of image rows -> index_put of
latent rows. Fused path: cat(image rows, latent rows) -> inject_embeddings. Layout per sequence of T=256:
50 image tokens at the start, 6 latents at columns 80..85 (22% injected). Bandwidth = bytes that must move
(fwd: read ids+index, read the chosen rows, write the output; bwd: read ids+index and grad_out, write the
dense grad_weight and grad_sources) / time.

    python bench/bench_inject.py [--device cpu|cuda] [--quick] [--dims 768,1024] [--rows 1024,4096] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcoconut.kernels import backend_for, inject_embeddings  # noqa: E402

VOCAB, SEQ, N_IMG, LAT_START, N_LAT = 50257, 256, 50, 80, 6
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_inputs(rows: int, dim: int, dtype, device):
    B = max(1, rows // SEQ)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (B, SEQ), generator=g).to(device)
    weight = (torch.randn(VOCAB, dim, generator=g) * 0.02).to(device, dtype).requires_grad_(True)
    img = torch.randn(B * N_IMG, dim, generator=g).to(device, dtype).requires_grad_(True)
    lat = torch.randn(B * N_LAT, dim, generator=g).to(device, dtype).requires_grad_(True)
    b = torch.arange(B, device=device)
    img_pos = (b.repeat_interleave(N_IMG), torch.arange(N_IMG, device=device).repeat(B))
    lat_pos = (b.repeat_interleave(N_LAT), torch.arange(LAT_START, LAT_START + N_LAT, device=device).repeat(B))
    index = torch.full((B, SEQ), -1, dtype=torch.long, device=device)
    index[img_pos] = torch.arange(B * N_IMG, device=device)
    index[lat_pos] = B * N_IMG + torch.arange(B * N_LAT, device=device)
    grad = torch.randn(B, SEQ, dim, generator=g).to(device, dtype)
    return dict(ids=ids, weight=weight, img=img, lat=lat, img_pos=img_pos, lat_pos=lat_pos, index=index,
                grad=grad)


def naive(x):
    emb = F.embedding(x["ids"], x["weight"]).clone()
    emb[x["img_pos"]] = x["img"]
    emb[x["lat_pos"]] = x["lat"]
    return emb


def fused(x):
    return inject_embeddings(x["ids"], x["weight"], torch.cat([x["img"], x["lat"]]), x["index"])


def time_pair(fn_a, fn_b, device, min_time=0.4, max_iters=40) -> tuple[float, float]:
    """Median seconds per call of two functions, run alternately (a shared, noisy machine drifts)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = ([], [])
    fn_a(), fn_b()
    sync()
    start = time.perf_counter()
    while len(times[0]) < 5 or (time.perf_counter() - start < min_time and len(times[0]) < max_iters):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def fwd_bwd(impl, x):
    def step():
        for t in (x["weight"], x["img"], x["lat"]):
            t.grad = None
        impl(x).backward(x["grad"])
    return step


def fwd(impl, x):
    def step():
        with torch.no_grad():
            impl(x)
    return step


def moved_bytes(x) -> tuple[int, int]:
    B, T = x["ids"].shape
    V, D = x["weight"].shape
    R, N, e = B * T, x["img"].shape[0] + x["lat"].shape[0], x["weight"].element_size()
    fwd_bytes = 16 * R + 2 * R * D * e
    bwd_bytes = 16 * R + R * D * e + V * D * e + N * D * e
    return fwd_bytes, bwd_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="D=768, rows 1k/4k, fp32 only")
    ap.add_argument("--dims", default="768,1024,1600")
    ap.add_argument("--rows", default=None, help="default: 1k,4k,16k on CPU; 1k..64k on CUDA")
    ap.add_argument("--dtypes", default=None, help="default: fp32,bf16 on CPU; fp32,fp16,bf16 on CUDA")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dims = [768] if args.quick else [int(d) for d in args.dims.split(",")]
    rows = args.rows or ("1024,4096" if args.quick else "1024,4096,16384,65536" if cuda else "1024,4096,16384")
    dtypes = args.dtypes or ("fp32" if args.quick else "fp32,fp16,bf16" if cuda else "fp32,bf16")
    rows, dtypes = [int(r) for r in rows.split(",")], dtypes.split(",")

    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"inject backend: {backend_for(device)}, MMCOCONUT_INJECT={os.environ.get('MMCOCONUT_INJECT', 'auto')}")
    print(f"# V={VOCAB}, T={SEQ}, {N_IMG} image + {N_LAT} latent rows per sequence; times are medians in ms")
    print("| D | rows | dtype | fwd fused | fwd naive | fwd speedup | fwd+bwd fused | fwd+bwd naive "
          "| fwd+bwd speedup | fused fwd GB/s | fused fwd+bwd GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dim in dims:
        for dtype_name in dtypes:
            for n_rows in rows:
                x = make_inputs(n_rows, dim, DTYPES[dtype_name], device)
                with torch.no_grad():
                    assert torch.equal(fused(x), naive(x)), "fused and naive outputs differ"
                t_ff, t_nf = time_pair(fwd(fused, x), fwd(naive, x), device)
                t_fb, t_nb = time_pair(fwd_bwd(fused, x), fwd_bwd(naive, x), device)
                fb, bb = moved_bytes(x)
                print(f"| {dim} | {x['ids'].numel()} | {dtype_name} | {t_ff * 1e3:.3f} | {t_nf * 1e3:.3f} "
                      f"| {t_nf / t_ff:.2f}x | {t_fb * 1e3:.2f} | {t_nb * 1e3:.2f} | {t_nb / t_fb:.2f}x "
                      f"| {fb / t_ff / 1e9:.1f} | {(fb + bb) / t_fb / 1e9:.1f} |", flush=True)
                del x


if __name__ == "__main__":
    main()
