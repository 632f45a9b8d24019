"""python -m mmcoconut.eval CKPT SHARDS [--views nocot,cot,coconut,dummy] [--stage K | --n-latents N] [--out DIR]
[--metrics FILE] [--tag T] [--batch-size B] [--max-samples N] [--annotations FILE] [--key=value ...]

CKPT: a DeepSpeed checkpoint (run dir, checkpoint root or tag dir; any ZeRO stage) or an export dir
. Several ranks (torchrun / deepspeed launcher) split the shards; rank 0 writes the results.
Scores cover every question the shards declare (sizes.json) or the annotation file holds: a question without a
prediction scores 0, as in the official A-OKVQA scorer; --max-samples scores the first N as a subset.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m mmcoconut.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="DeepSpeed checkpoint (run/root/tag dir) or export dir")
    ap.add_argument("shards", help="shard dir, brace pattern or '::'-joined list")
    ap.add_argument("--views", default=None, help="comma list (default: eval.views of the config)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--stage", type=int, default=None, help="per-sample latents min(max_latent_stage, #steps, K) * "
                   "c_thought (Coconut; default K = max_latent_stage)")
    g.add_argument("--n-latents", type=int, default=None, help="one latent count for every coconut/dummy prompt")
    ap.add_argument("--out", default=None, help="output dir (default: <run dir>/eval or <export>/eval)")
    ap.add_argument("--metrics", default=None, help="metrics.jsonl to append eval records to (default: "
                    "<out>/metrics.jsonl; give <run dir>/metrics.jsonl to plot them with the run)")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: eval.batch_size")
    ap.add_argument("--max-samples", type=int, default=None, help="evaluate and score only the first N samples")
    ap.add_argument("--annotations", default=None, help="official annotation json (e.g. aokvqa_v1p0_val.json): "
                    "its questions are the expected set (default: eval.annotations, else the shards' samples)")
    ap.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_known_args(argv)


def _init_distributed():
    """(rank, world_size, local_rank); joins the process group when launched with several ranks."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    if world > 1 and not torch.cuda.is_available():  # share the cores instead of oversubscribing them
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, local


def _default_out(ckpt: str, info: dict, cfg) -> Path:
    if "export" in info:
        return Path(ckpt) / "eval"
    run_dir = Path(cfg.run_dir)
    base = run_dir if run_dir.is_dir() else Path(info["root"])
    return base / f"eval-{info['tag']}"


def main(argv=None) -> int:
    args, rest = _parse(sys.argv[1:] if argv is None else argv)
    import torch

    from mmcoconut.config import ConfigError, parse_overrides
    from mmcoconut.export.hf_export import load_any
    from mmcoconut.eval.evaluate import VIEWS, evaluate

    try:
        parse_overrides(rest)  # fail early on malformed overrides
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.views and set(args.views.split(",")) - set(VIEWS):
        print(f"error: --views {args.views}: choose from {','.join(VIEWS)}", file=sys.stderr)
        return 2
    rank, world, local = _init_distributed()
    device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    try:
        model, tok, improc, cfg, info = load_any(args.ckpt, tag=args.tag, overrides=rest, device=device)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    views = args.views.split(",") if args.views else list(cfg.eval.views)
    out = Path(args.out) if args.out else _default_out(args.ckpt, info, cfg)
    c = cfg.curriculum
    stage = c.max_latent_stage if args.stage is None else args.stage
    lat = f"{args.n_latents} latents" if args.n_latents is not None else \
        f"per-sample latents at stage {stage} (c_thought {c.c_thought}, max_latent_stage {c.max_latent_stage})"
    if rank == 0:
        print(f"eval: {info['checkpoint']} on {args.shards} | views {','.join(views)} | {lat} | "
              f"{world} rank(s) on {device} | out {out}", flush=True)
    torch.manual_seed(cfg.train.seed)  # reproducible dummy_latent=random
    try:
        if args.annotations and not os.path.isfile(args.annotations):
            raise FileNotFoundError(f"--annotations: file not found: {args.annotations}")
        evaluate(model, tok, improc, cfg, args.shards, views, str(out), rank=rank, world_size=world,
                 n_latents=args.n_latents, stage=stage, max_samples=args.max_samples, batch_size=args.batch_size,
                 extra={"checkpoint": info["checkpoint"]}, metrics_path=args.metrics, annotations=args.annotations)
    except FileNotFoundError as e:  # shards / annotation file
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"eval: wrote {out}/predictions_<view>.json, {out}/eval_results.json, "
              f"{args.metrics or str(out / 'metrics.jsonl')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
