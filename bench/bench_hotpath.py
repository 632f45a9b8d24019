"""Benchmark: the latent forward's hot path on CPU proxies (issue 12). Runs against any checkout (--code DIR) so
the same batches measure the code before and after.

GPT-2 124M config (random weights, vocab 50262), or with --arch llama a Llama-family model of similar size (SmolLM2-135M's
shapes: 30 layers, 576 wide, 9 query / 3 K/V heads, vocab 49152 + 5, tied; random weights), + a tiny frozen CLIP tower
(1 pooled image token: the LM is what is measured), B=8, rows = <image> + 40 question + START + n latents + END + 20
answer tokens.
  syncs    device->host reads in forward+backward of one micro-batch (mmcoconut.testing.HostSyncCounter)
  vd       ops producing a [V, D] tensor during backward (VDGradCounter), by op
  saved    bytes autograd keeps for backward during the forward (saved_activation_bytes; parameters excluded)
  rss      peak resident-set growth of the process during one forward (Linux VmHWM reset through
           /proc/self/clear_refs after malloc_trim; the output kept alive), latent and plain batch
  ops      profiler op events per extra latent pass: events(n + 1 latents) - events(n), forward+backward
  prof     where a's extra time goes: profiler self-CPU time by op of one latent and one plain forward+backward
           (n = the first of --n), the ops with the largest difference
  a/c      cached latent forward+backward / plain forward+backward over the same tokens (latents replaced by an
           ordinary token: one LM call), interleaved repeats; min / median / max of the per-repeat ratio;
           --compare-wgrad adds a0/c, the latent forward with plain autograd weight gradients (wgrad.py off)
  dispatch host overhead per latent pass, a CPU proxy for launch-boundness: a toy GPT-2 (n_embd 64, 12 layers,
           vocab 1024; --batch, default 4) where compute is negligible, eager and compiled (enable_compile(): inductor
           fullgraph; a deep copy of the same weights), repeats interleaved in one process, medians. Per latent pass
           = (fwd+bwd of the batch with n latents - fwd+bwd of the same tokens with the latents as plain tokens) / n:
           the cost of one extra one-column pass, forward and backward. Also: ATen ops and profiler events per
           latent pass (ops, for each), and the whole step / (n + 1) passes.

    python bench/bench_hotpath.py [--code DIR] [--what syncs,vd,saved,rss,ops,prof,ac] [--n 4,8] [--reps 7]
                                  [--compile] [--small [--layers L]] [--compare-wgrad] [--arch gpt2|llama]
    python bench/bench_hotpath.py --what dispatch [--n 8] [--batch 4] [--reps 15] [--prof]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]


def load_probes():
    spec = importlib.util.spec_from_file_location("mmc_probes", HERE / "mmcoconut" / "testing.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lm_config(arch: str, small: bool, layers=None):
    from transformers import GPT2Config, LlamaConfig

    if arch == "llama":  # SmolLM2-135M's shapes (a Llama-family model the size of GPT-2 124M)
        big = dict(vocab_size=49152 + 5, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048)
        if small:
            big.update(vocab_size=8192, hidden_size=256, intermediate_size=640, num_hidden_layers=layers or 4,
                       num_attention_heads=4, num_key_value_heads=2)
        return LlamaConfig(tie_word_embeddings=True, rms_norm_eps=1e-5, **big)
    lcfg = GPT2Config(vocab_size=8192, n_embd=256, n_layer=layers or 4, n_head=4) if small \
        else GPT2Config(vocab_size=50262)
    lcfg.attn_pdrop = lcfg.resid_pdrop = lcfg.embd_pdrop = 0.0  # same work and numerics in every variant
    return lcfg


def build(small: bool, layers=None, arch: str = "gpt2", toy: bool = False):
    from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, GPT2Config

    from mmcoconut.modeling.latent import MMCoconut
    from mmcoconut.modeling.projector import build_projector
    from mmcoconut.modeling.tokens import SpecialIds
    torch.manual_seed(0)
    if toy:  # dispatch proxy: GPT-2 124M's depth and op graph at negligible width
        lcfg = GPT2Config(vocab_size=1024, n_embd=64, n_layer=12, n_head=4)
        lcfg.attn_pdrop = lcfg.resid_pdrop = lcfg.embd_pdrop = 0.0
    else:
        lcfg = lm_config(arch, small, layers)
    vcfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=16)
    V = lcfg.vocab_size
    ids = SpecialIds(image=V - 5, start=V - 4, latent=V - 3, end=V - 2, pad=V - 1, eos=0)
    lm = AutoModelForCausalLM.from_config(lcfg)
    model = MMCoconut(lm, CLIPVisionModel(vcfg).requires_grad_(False),
                      build_projector("mlp2x_gelu", 64, lcfg.hidden_size), ids, 1)
    return model.train()


def make_batch(model, B: int, n: int, seed: int = 0, plain: bool = False):
    ids, V = model.ids, model.lm.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    rnd = lambda k: torch.randint(1, V - 5, (B, k), generator=g)  # noqa: E731
    parts = [torch.full((B, 1), ids.image), rnd(40), torch.full((B, 1), ids.start),
             torch.full((B, n), 7 if plain else ids.latent), torch.full((B, 1), ids.end), rnd(20)]
    input_ids = torch.cat(parts, 1)
    labels = input_ids.clone()
    labels[:, :43 + n] = -100
    b = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
         "position_ids": torch.arange(input_ids.shape[1]).expand(B, -1).contiguous(),
         "pixel_values": torch.randn(B, 3, 32, 32, generator=g)}
    b = {k: v.to(DEVICE) for k, v in b.items()}
    try:  # the hot-path code: the Collator's host-side plan (with the labelled positions where it knows them)
        import inspect
        from mmcoconut.modeling.pass_plan import plan_batch
        kw = {"labels": labels} if "labels" in inspect.signature(plan_batch).parameters else {}
        b["latent_plan"] = plan_batch(input_ids, ids.latent, ids.image, **kw).to(DEVICE)
        if "return_logits" in inspect.signature(type(model).forward).parameters:
            b["return_logits"] = False  # what training does (no [B, T, V] logits)
    except ImportError:
        pass
    return b


DEVICE = torch.device("cpu")


def fwd_bwd(model, b):
    model.zero_grad(set_to_none=True)
    out = model(**b)
    out.loss.backward()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return out


def measure_syncs_vd(model, b, P):
    model.zero_grad(set_to_none=True)
    with P.HostSyncCounter() as c:
        out = model(**b)
        with P.VDGradCounter(model.lm.get_input_embeddings().weight.shape) as vd:
            out.loss.backward()
    return {"syncs": c.total, "sync_ops": dict(c.counts), "vd": dict(vd.counts), "loss": out.loss.item()}


def measure_ops(model, B, n):
    from torch.profiler import ProfilerActivity, profile
    counts, warm, by_op = [], [], []
    for k in (n, n + 1):
        b = make_batch(model, B, k, seed=1)
        t0 = time.perf_counter()
        fwd_bwd(model, b)  # warm-up (and compile)
        warm.append(round(time.perf_counter() - t0, 1))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fwd_bwd(model, b)
        ev = prof.key_averages()
        counts.append((sum(e.count for e in ev if e.key.startswith("aten::")), sum(e.count for e in ev)))
        by_op.append({e.key: e.count for e in ev if e.key.startswith("aten::")})
    extra = {op: by_op[1].get(op, 0) - by_op[0].get(op, 0) for op in set(by_op[0]) | set(by_op[1])}
    return {"aten_ops_per_latent_pass": counts[1][0] - counts[0][0],
            "events_per_latent_pass": counts[1][1] - counts[0][1], "aten_ops_total": [c[0] for c in counts],
            "top_aten_ops_per_latent_pass": dict(sorted(extra.items(), key=lambda kv: -kv[1])[:10]),
            "warmup_s": warm}


def measure_prof(model, B, n, top=25):
    """Self-CPU ms by ATen op: latent (a) vs plain (c) forward+backward of the same tokens, largest a - c first."""
    from torch.profiler import ProfilerActivity, profile
    res = {}
    for name, plain in (("a", False), ("c", True)):
        b = make_batch(model, B, n, seed=2, plain=plain)
        fwd_bwd(model, b)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fwd_bwd(model, b)
        res[name] = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    keys = set(res["a"]) | set(res["c"])
    z = (0.0, 0)
    diff = sorted(((res["a"].get(k, z)[0] - res["c"].get(k, z)[0], k) for k in keys), reverse=True)
    return {"total_ms": {k: round(sum(t for t, _ in v.values()), 1) for k, v in res.items()},
            "top_extra": [{"op": k, "a_ms": round(res["a"].get(k, z)[0], 1), "c_ms": round(res["c"].get(k, z)[0], 1),
                           "a_calls": res["a"].get(k, z)[1], "c_calls": res["c"].get(k, z)[1]}
                          for _, k in diff[:top]]}


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_rss(fn):
    """(peak RSS growth, RSS kept) in MiB while fn() runs and its result is alive: Linux's peak-RSS counter
    (VmHWM) is reset by writing 5 to /proc/self/clear_refs after returning free heap pages to the OS."""
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss_kib("VmRSS")
    out = fn()
    peak, kept = _rss_kib("VmHWM"), _rss_kib("VmRSS")
    del out
    return round((peak - base) / 1024, 1), round((kept - base) / 1024, 1)


def measure_dispatch(B: int, n: int, reps: int, prof: bool = False) -> dict:
    """Eager vs compiled host time per latent pass on the toy model (module doc), interleaved repeats."""
    import copy
    eager = build(False, toy=True)
    compiled = copy.deepcopy(eager)
    compiled.enable_compile()
    models = {"eager": eager, "compiled": compiled}
    batches = {"a": make_batch(eager, B, n, seed=2), "c": make_batch(eager, B, n, seed=2, plain=True)}
    res = {"model": "GPT-2 n_embd 64, 12 layers, vocab 1024", "batch": B, "n": n, "reps": reps,
           "T": batches["a"]["input_ids"].shape[1]}
    times = {(m, k): [] for m in models for k in batches}
    t0 = time.perf_counter()
    for m, model in models.items():  # warm-up (compiles: pass 0, the one-column and the last pass, backward)
        for k, b in batches.items():
            fwd_bwd(model, b)
            fwd_bwd(model, b)
            print(f"warm-up {m} {k} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    res["warmup_s"] = round(time.perf_counter() - t0, 1)
    for _ in range(reps):
        for m, model in models.items():
            for k, b in batches.items():
                t0 = time.perf_counter()
                fwd_bwd(model, b)
                times[m, k].append(time.perf_counter() - t0)
    med = {key: statistics.median(v) for key, v in times.items()}
    for m in models:
        res[m] = {"step_ms_latent": round(1e3 * med[m, "a"], 2), "step_ms_plain": round(1e3 * med[m, "c"], 2),
                  "ms_per_latent_pass": round(1e3 * (med[m, "a"] - med[m, "c"]) / n, 3),
                  "ms_per_pass_whole_step": round(1e3 * med[m, "a"] / (n + 1), 3),
                  "per_latent_pass_ms_by_rep": [round(1e3 * (a - c) / n, 3) for a, c in zip(times[m, "a"],
                                                                                            times[m, "c"])]}
        _emit(res)
        res[m]["ops"] = measure_ops(models[m], B, n)
        _emit(res)
        if prof:  # where the latent batch's extra host time goes, by op (self CPU time)
            res[m]["prof"] = measure_prof(models[m], B, n, top=12)
            _emit(res)
    res["compiled/eager_per_latent_pass"] = round(res["compiled"]["ms_per_latent_pass"]
                                                  / res["eager"]["ms_per_latent_pass"], 3)
    res["compiled/eager_whole_step"] = round(med["compiled", "a"] / med["eager", "a"], 3)
    return res


def measure_ac(model, B, n, reps, compare_wgrad=False):
    """Interleaved repeats of a (latent) and c (plain); with compare_wgrad also a0 = a with the projections' weight
    gradients left to plain autograd (model.deferred_wgrad = False), in the same process and repeat."""
    a_b, c_b = make_batch(model, B, n, seed=2), make_batch(model, B, n, seed=2, plain=True)
    runs = {"a": (a_b, True), "c": (c_b, True)}
    if compare_wgrad:
        runs["a0"] = (a_b, False)
    times = {k: [] for k in runs}
    for rep in range(reps + 1):  # the first round is the warm-up
        for k, (b, deferred) in runs.items():
            model.deferred_wgrad = deferred
            t0 = time.perf_counter()
            fwd_bwd(model, b)
            if rep:
                times[k].append(time.perf_counter() - t0)
    model.deferred_wgrad = True
    res = {}
    for k in times:
        res[k + "_ms"] = [round(1e3 * f(times[k]), 1) for f in (min, statistics.median, max)]
    for k in [x for x in times if x != "c"]:
        ratios = sorted(x / y for x, y in zip(times[k], times["c"]))
        key = "a/c" if k == "a" else k + "/c"
        res[key] = [round(f(ratios), 3) for f in (min, statistics.median, max)]
        res[key + "_of_medians"] = round(statistics.median(times[k]) / statistics.median(times["c"]), 3)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code", default=str(HERE), help="checkout whose mmcoconut package is measured")
    ap.add_argument("--what", default="syncs,vd,saved,ops,ac")
    ap.add_argument("--n", default="4,8", help="latent counts for a/c")
    ap.add_argument("--saved-n", type=int, default=6, help="latents for the saved-bytes figure (stage 3 x c=2)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (4 for --what dispatch)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="model.enable_compile() (hot-path code only)")
    ap.add_argument("--small", action="store_true", help="a small LM (smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="with --small: this many layers (op counts per pass "
                    "depend on the layer count, not the width: --small --layers 12 counts GPT-2 124M's ops)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"), help="GPT-2 124M or SmolLM2-135M shapes")
    ap.add_argument("--prof", action="store_true", help="with --what dispatch: profiler self-CPU time by op, "
                    "latent vs plain batch, eager and compiled")
    ap.add_argument("--compare-wgrad", action="store_true", help="a/c also with model.deferred_wgrad = False "
                    "(plain autograd weight gradients), interleaved in the same repeats")
    args = ap.parse_args(argv)
    sys.path.insert(0, args.code)
    if args.threads:
        torch.set_num_threads(args.threads)
    P = load_probes()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.what == "dispatch":  # its own toy models (module doc)
        res = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__}
        res.update(measure_dispatch(args.batch or 4, int(args.n.split(",")[0]), args.reps, args.prof))
        print(json.dumps(res), flush=True)
        return
    model = build(args.small, args.layers, args.arch).to(DEVICE)
    if args.compile:
        model.enable_compile()
    what, B = args.what.split(","), args.batch or 8
    res = {"code": args.code, "device": args.device, "arch": args.arch, "batch": B, "threads": torch.get_num_threads(),
           "compile": args.compile,
           "torch": torch.__version__}
    if "syncs" in what or "vd" in what:
        b = make_batch(model, B, 4, seed=3)
        fwd_bwd(model, b)
        res["n4"] = measure_syncs_vd(model, b, P)
        _emit(res)
    if "saved" in what:
        b = make_batch(model, B, args.saved_n, seed=4)
        _, res["saved_MiB_latent"] = P.saved_activation_bytes(lambda: model(**b), exclude=list(model.parameters()))
        _, res["saved_MiB_plain"] = P.saved_activation_bytes(
            lambda: model(**make_batch(model, B, args.saved_n, seed=4, plain=True)), exclude=list(model.parameters()))
        res["saved_MiB_latent"] = round(res["saved_MiB_latent"] / 2**20, 1)
        res["saved_MiB_plain"] = round(res["saved_MiB_plain"] / 2**20, 1)
        _emit(res)
    if "rss" in what:  # before anything else allocates and frees large blocks (run with --what rss alone)
        for plain in (False, True):
            b = make_batch(model, B, args.saved_n, seed=4, plain=plain)
            with torch.no_grad():
                model(**b)  # first-call allocations (extension load, caches) out of the figure
            res["rss_MiB_" + ("plain" if plain else "latent")] = dict(zip(("peak", "kept"),
                                                                          measure_rss(lambda: model(**b))))
        _emit(res)
    if "ops" in what:
        res["ops"] = measure_ops(model, B, 4)
        _emit(res)
    if "prof" in what:
        res["prof"] = measure_prof(model, B, int(args.n.split(",")[0]))
        _emit(res)
    if "ac" in what:
        res["ac"] = {}
        for n in args.n.split(","):
            res["ac"][n] = measure_ac(model, B, int(n), args.reps, args.compare_wgrad)
            _emit(res)
    print(json.dumps(res), flush=True)


def _emit(res):
    print("partial:", json.dumps(res), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
