"""Benchmark: a ~0.5B-parameter Llama-family model (Qwen2.5-0.5B's shapes, random weights) trained with latents on
2 CPU ranks through the trainer, under ZeRO-2 and ZeRO-3: peak memory per rank, DeepSpeed's own model-states
estimate, step time, and an exact save -> resume.

Model: Qwen2Config with Qwen2.5-0.5B's shapes (24 layers, 896 wide, 14 query / 2 K/V heads, MLP 4864, vocabulary
151936, tied embeddings; 494M parameters), random weights saved once as an ordinary HF dir with a locally trained
Qwen2-style tokenizer (its 4 mmcoconut tokens land in the table's spare rows, as with the real tokenizer) + a tiny
frozen CLIP tower (1 pooled image token). Data: 64 synthetic "shapes" samples (tools/make_shards.py, 32 px).
Curriculum: c_thought 2, stages 0, 1, 2 for one epoch each, --steps optimizer steps per epoch (micro-batch 1 per rank,
no accumulation: global batch 2); a checkpoint after the first stage-2 step, from which a fresh 2-rank run resumes.
  peak     max over the run of each rank process's VmHWM (/proc/<pid>/status, sampled every 0.2 s): everything the
           process held at its peak (model states, activations, buffers, the Python/torch baseline, loading)
  train    max VmRSS of each rank sampled while it trains (from its "train: world ..." line on): without the load;
           by_stage: the same split by the curriculum stage of the step running (0: no latents; 2: 4 latents)
  estimate deepspeed's estimate_zero2/3_model_states_mem_needs (what estimate_zero*_..._all_live print) for the same
           parameter count and largest layer, 2 ranks, no offload: model states for 16-bit parameters
  step     median seconds per optimizer step at stage 2 (global batch / samples_per_s of metrics.jsonl)
  resume   the stage-2 losses after the checkpoint, resumed run vs uninterrupted run: equal bit for bit?

    python bench/bench_zero_backbone.py [--out DIR] [--zero 2,3] [--precision fp32] [--steps 3] [--gc] [--small]
                                        [--z3-live N] [--layers L]
--layers: Qwen2.5-0.5B's shapes with L decoder layers instead of 24 (a smaller model when 2 x the 0.5B run's
memory is more than the machine has free).
--z3-live: ZeRO-3's stage3_max_live_parameters / prefetch bucket / max_reuse_distance (default 1e8 parameters; the
shipped zero3 files keep 1e9, which lets a 0.5B model stay gathered whole and ZeRO-3 save nothing over ZeRO-2).

--small: the same run on a 2-layer, 128-wide model (a smoke test of the plumbing; its figures mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
SMALL = dict(QWEN25_05B, vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
SHAPES = QWEN25_05B  # --small: SMALL


def make_model_dir(out: Path) -> dict:
    """<out>/lm (Qwen2.5-0.5B shapes, random weights, fp32) and <out>/tiny/vision, once."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from mmcoconut.data.synthetic import synthetic_texts
    from mmcoconut.tiny_models import make_tiny_models, train_tokenizer
    vision = make_tiny_models(out / "tiny", "test", seed=0)["vision"]
    lm = out / "lm"
    if not (lm / "config.json").is_file():
        tok = train_tokenizer(synthetic_texts(2000, 0), 600, "qwen2")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(eos_token_id=tok.eos_token_id,
                                                             pad_token_id=tok.pad_token_id, **SHAPES))
        model.save_pretrained(lm)
        tok.save_pretrained(lm)
        del model
    return {"lm": str(lm), "vision": vision}


def param_counts() -> tuple[int, int]:
    """(parameters, largest layer's) as DeepSpeed's model_to_params counts them (tied weights once)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPES))
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def ds_estimates(total: int, largest: int, ranks: int = 2) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    z2 = estimate_zero2_model_states_mem_needs(total, ranks, 1, cpu_offload=False)[1]
    z3 = estimate_zero3_model_states_mem_needs(total, largest, ranks, 1, cpu_offload=False, cpu_offload_params=False,
                                               zero_init=True)[1]
    return {2: z2, 3: z3}


def setup(out: Path, dirs: dict, steps: int, gc: bool) -> Path:
    import yaml
    shards = out / "shards"
    if not (shards / "sizes.json").exists() and not list(shards.glob("**/sizes.json")):
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--synthetic", "64", "--seed", "0",
                        "--out", str(shards), "--maxcount", "16", "--image-size", "32", "--workers", "1",
                        "--no-progress"], check=True)
    cfg = {"model": {"lm_id": dirs["lm"], "vision_id": dirs["vision"], "image_tokens": "pooled",
                     "new_token_init": "", "max_length": 256},
           "data": {"train_shards": str(shards), "num_workers": 0, "shuffle_buffer": 16},
           "curriculum": {"c_thought": 2, "max_latent_stage": 2, "epochs_per_stage": 1},
           "train": {"name": "zero", "num_epochs": 3, "max_steps_per_epoch": steps, "lr": 1e-4, "log_every": 1,
                     "gradient_checkpointing": gc},
           "checkpoint": {"save_every_steps": 2 * steps + 1, "keep_last": 2},
           "logging": {"report_to": "none"}, "eval": {"val_every_epoch": False}}
    path = out / ("cfg_gc.yaml" if gc else "cfg.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def ds_config(out: Path, zero: int, live: int) -> Path:
    base = json.loads((ROOT / "ds_configs" / f"zero{zero}_2gpu.json").read_text())
    base.update(train_batch_size=2, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    if zero == 3:
        base["zero_optimization"].update(stage3_max_live_parameters=live, stage3_max_reuse_distance=live,
                                         stage3_prefetch_bucket_size=min(live, 50_000_000))
    path = out / f"zero{zero}.json"
    path.write_text(json.dumps(base))
    return path


def _rank_pids(run_dir: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "mmcoconut.train" in cmd and run_dir in cmd and "--local_rank" in cmd:
                pids.append(int(p.name))
    return pids


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def launch(cfg: Path, ds: Path, run: Path, precision: str, extra=(), steps_per_epoch: int = 2,
           skip_steps: int = 0) -> dict:
    """2 ranks of the trainer; returns {"rc", "seconds", "peak_GiB": [per rank], "train_GiB": [per rank], "log"}."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(29500 + os.getpid()
           % 1000), "--module", "mmcoconut.train", str(cfg), "--deepspeed", str(ds), f"--train.precision={precision}",
           f"--logging.run_dir={run}", *extra]
    log = open(run.parent / f"{run.name}.log", "w")
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peaks: dict[int, int] = {}
    training: dict[int, int] = {}
    by_stage: dict[int, int] = {}
    metrics = run / "metrics.jsonl"
    try:
        while p.poll() is None:
            started = "train: world" in Path(log.name).read_text(errors="replace")
            done = metrics.read_text().count('"kind": "train"') if metrics.is_file() else 0
            stage = min((done + skip_steps) // steps_per_epoch, 2)  # the stage of the step running now
            for pid in _rank_pids(str(run)):
                peaks[pid] = max(peaks.get(pid, 0), _status_kib(pid, "VmHWM"))
                if started:
                    rss = _status_kib(pid, "VmRSS")
                    training[pid] = max(training.get(pid, 0), rss)
                    by_stage[stage] = max(by_stage.get(stage, 0), rss)
            time.sleep(0.2)
    except KeyboardInterrupt:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    log.close()
    return {"rc": p.returncode, "seconds": round(time.time() - t0, 1),
            "peak_GiB": sorted(round(v / 2**20, 2) for v in peaks.values() if v),
            "train_GiB": sorted(round(v / 2**20, 2) for v in training.values() if v),
            "train_GiB_by_stage": {k: round(v / 2**20, 2) for k, v in sorted(by_stage.items())}, "log": str(log.name)}


def drop_checkpoints(run: Path) -> None:
    """Checkpoint tags of a finished run (GBs at this size): only metrics.jsonl and the logs are kept."""
    for d in run.glob("*"):
        if d.is_dir() and d.name.startswith(("step", "epoch")):
            shutil.rmtree(d, ignore_errors=True)


def losses(run: Path) -> dict:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if r.get("kind") == "train"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/mmcoconut_zero_bench")
    ap.add_argument("--zero", default="2,3")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per epoch (stages 0, 1, 2)")
    ap.add_argument("--gc", action="store_true", help="train.gradient_checkpointing=true")
    ap.add_argument("--small", action="store_true", help="a 2-layer model: smoke test")
    ap.add_argument("--z3-live", type=int, default=100_000_000, help="ZeRO-3 max live / prefetch parameters")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: Qwen2.5-0.5B's 24)")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global SHAPES
    SHAPES = SMALL if args.small else QWEN25_05B
    if args.layers:
        SHAPES = dict(SHAPES, num_hidden_layers=args.layers)
    out = Path(args.out + ("_small" if args.small else "") + (f"_L{args.layers}" if args.layers else ""))
    out.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        make_model_dir(out)
        return 0
    # the random weights are made in a child process: this one stays small while the ranks run
    subprocess.run([sys.executable, __file__, "--prepare-only", "--out", args.out] + (["--small"] * args.small)
                   + ([f"--layers={args.layers}"] if args.layers else []), check=True)
    dirs = make_model_dir(out)
    total, largest = param_counts()
    est = ds_estimates(total, largest)
    cfg = setup(out, dirs, args.steps, args.gc)
    res = {"params": total, "largest_layer_params": largest, "precision": args.precision, "gc": args.gc,
           "z3_live": args.z3_live, "layers": SHAPES["num_hidden_layers"],
           "steps_per_epoch": args.steps, "runs": {}}
    ckpt_step = 2 * args.steps + 1
    for z in map(int, args.zero.split(",")):
        name = f"z{z}{'_gc' if args.gc else ''}_{args.precision}"
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        first = launch(cfg, ds_config(out, z, args.z3_live), run, args.precision, steps_per_epoch=args.steps)
        row = {"estimate_GiB": round(est[z] / 2**30, 2), "first": first}
        if first["rc"] == 0:
            a = losses(run)
            stage2 = [r for r in a.values() if r["stage"] == 2]
            row["step_s_stage2"] = round(statistics.median(2 / r["samples_per_s"] for r in stage2), 2)
            row["step_s_all"] = {s: round(2 / r["samples_per_s"], 2) for s, r in a.items()}
            row["losses"] = {s: r["loss"] for s, r in a.items()}
            resumed = out / f"{name}_resumed"
            shutil.rmtree(resumed, ignore_errors=True)
            shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("metrics.jsonl"))
            second = launch(cfg, ds_config(out, z, args.z3_live), resumed, args.precision,
                            [f"--checkpoint.resume=step{ckpt_step:08d}"], args.steps, ckpt_step)
            row["resume"] = second
            if second["rc"] == 0:
                b = losses(resumed)
                row["resumed_losses"] = {s: r["loss"] for s, r in b.items()}
                row["resume_exact"] = sorted(b) == [s for s in sorted(a) if s > ckpt_step] and all(
                    b[s]["loss"] == a[s]["loss"] for s in b)
            drop_checkpoints(resumed)
        drop_checkpoints(run)
        res["runs"][name] = row
        print(json.dumps({name: row}), flush=True)
    tag = f"{args.precision}{'_gc' if args.gc else ''}_z{args.zero.replace(',', '')}"
    (out / f"result_{tag}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
