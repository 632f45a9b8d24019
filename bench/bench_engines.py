#!/usr/bin/env python
"""Training-step time of the engines side by side: DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 on 2 CPU ranks (gloo, one
thread each), GPT-2 124M shapes (12 layers, 768 wide, vocabulary 50257) with a frozen CLIP ViT-B/32-shaped vision
tower (patch tokens), random weights built with transformers (nothing downloaded), the same synthetic shards,
fp32, micro-batch 2 x accumulation 2 x 2 ranks. Latents: curriculum.uniform_prob=1 draws every sample's stage in
0..3 (c_thought 2), so most micro-batches run the longest pass count (7 LM calls). Each engine trains `--steps`
optimizer steps (stopped without a checkpoint); the step time is the median gap between consecutive train
records (log_every 1) after the first `--warmup` steps.

  python bench/bench_engines.py [--work DIR] [--steps 8] [--warmup 3] [--engines zero2,zero3,fsdp2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_models(work: Path) -> dict:
    """GPT-2 124M and CLIP ViT-B/32 shapes, random weights, a locally trained tokenizer (ids < 50257)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    from mmcoconut.data.synthetic import synthetic_texts
    from mmcoconut.factory import clip_image_processor_class
    from mmcoconut.tiny_models import train_tokenizer

    dirs = {"lm": work / "models" / "lm", "vision": work / "models" / "vision"}
    if (dirs["vision"] / "preprocessor_config.json").is_file():
        return {k: str(v) for k, v in dirs.items()}
    torch.manual_seed(0)
    tok = train_tokenizer(synthetic_texts(2000, 0), 1000)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(dirs["lm"])
    tok.save_pretrained(dirs["lm"])
    CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, image_size=224, patch_size=32)).save_pretrained(
        dirs["vision"])
    clip_image_processor_class()(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        dirs["vision"])
    return {k: str(v) for k, v in dirs.items()}


def build_shards(work: Path) -> str:
    out = work / "shards"
    if not list(out.glob("train-*.tar")):
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--synthetic", "256", "--seed", "0",
                        "--split", "train", "--out", str(out), "--maxcount", "64", "--image-size", "224",
                        "--no-progress"], check=True, cwd=ROOT)
    return str(out / "train")


def ds_config(work: Path, stage: int) -> str:
    cfg = json.loads((ROOT / "ds_configs" / f"zero{stage}_2gpu.json").read_text())
    cfg.update(train_batch_size=8, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    path = work / f"zero{stage}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def run_engine(name: str, a, work: Path, models: dict, shards: str) -> dict:
    run = work / f"run-{name}"
    if run.exists():
        import shutil
        shutil.rmtree(run)
    common = ["demo", f"--model.lm_id={models['lm']}", f"--model.vision_id={models['vision']}",
              "--model.freeze_vision=true", "--model.max_length=256", f"--data.train_shards={shards}",
              "--data.val_shards=", "--data.num_workers=1", "--curriculum.uniform_prob=1.0",
              "--curriculum.c_thought=2", "--curriculum.max_latent_stage=3", "--curriculum.pad_latent_to_max=false",
              "--train.precision=fp32", "--train.num_epochs=1", "--train.log_every=1", "--train.micro_batch_size=2",
              f"--logging.run_dir={run}", "--logging.report_to=none", "--checkpoint.resume=none",
              "--checkpoint.save_every_steps=0"]
    if name == "fsdp2":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_port()), "-m",
               "mmcoconut.train", *common, "--train.engine=fsdp2", "--train.gradient_accumulation_steps=2"]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()), "--module",
               "mmcoconut.train", *common, "--deepspeed", ds_config(work, int(name[-1]))]
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", MMCOCONUT_TEST_FAULTS=f"stop_after_steps={a.steps}")
    load = os.getloadavg()[0]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=a.timeout)
    if r.returncode != 0:
        raise SystemExit(f"{name}: exit {r.returncode}\n{(r.stdout + r.stderr)[-4000:]}")
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    times = [x["time"] for x in recs if x["kind"] == "train"]
    gaps = [b - c for b, c in zip(times[1:], times[:-1])][a.warmup - 1:]
    step = statistics.median(gaps)
    return {"engine": name, "step_s": round(step, 3), "samples_per_s": round(8 / step, 2), "steps_timed": len(gaps),
            "wall_s": round(time.time() - t0, 1), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mmcoconut-bench-engines")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--engines", default="zero2,zero3,fsdp2")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    models, shards = build_models(work), build_shards(work)
    results = []
    for name in a.engines.split(","):
        res = run_engine(name, a, work, models, shards)
        results.append(res)
        print(json.dumps(res), flush=True)
    print(f"{'engine':8} {'step s':>8} {'samples/s':>10} {'load before/after':>18}")
    for r in results:
        print(f"{r['engine']:8} {r['step_s']:>8} {r['samples_per_s']:>10} {r['load_before']:>9}/{r['load_after']}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
