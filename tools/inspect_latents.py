#!/usr/bin/env python
"""Decode the continuous thoughts of a trained model on a few samples (Coconut's analysis of what a latent
encodes): each thought through the LM head (top-k tokens, probabilities) and its cosine similarity to the
embeddings of the step tokens it replaced. Prints a table, writes OUT/latents.png (heat map) and OUT/latents.json.

  python tools/inspect_latents.py CKPT SHARDS [--keys K1,K2 | --first N] [--stage K] [--topk 5] [--out DIR]

CKPT: a run dir / DeepSpeed checkpoint / export dir (as for python -m mmcoconut.eval). The coconut prompt of each
sample gets Coconut's per-sample latent count at --stage (default: max_latent_stage).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_rows(shards: str, tok, improc, cfg, n_image_tokens: int, stage: int, keys, first: int) -> list[dict]:
    """Coconut prompt rows of the chosen samples (keys: tar keys or question ids; else the first `first`)."""
    from mmcoconut.data.curriculum import build_prompt
    from mmcoconut.data.eval_loader import positioned_samples
    from mmcoconut.data.pipeline import RowBuilder, SkipCounter
    from mmcoconut.data.shardlist import ShardReader, expand_shards

    urls, skips = expand_shards(shards), SkipCounter()
    builder = RowBuilder(tok, improc, cfg, n_image_tokens, skips)
    want, rows = set(keys or ()), []
    for _, raw in positioned_samples(ShardReader.from_config(cfg.data, skips), urls, [0] * len(urls)):
        row = builder.build(raw, build_prompt, view="coconut", stage=stage, cur=cfg.curriculum, n_latents=None)
        if row is None:
            continue
        qid = str(row["meta"].get("question_id", row["key"]))
        if want and row["key"] not in want and qid not in want:
            continue
        rows.append(dict(row, question_id=qid))
        if (want and len(rows) == len(want)) or (not want and len(rows) >= first):
            break
    missing = want - {r["key"] for r in rows} - {r["question_id"] for r in rows}
    if missing:
        raise ValueError(f"samples not found (or skipped) in {shards}: {sorted(missing)[:5]}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("shards")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--keys", default=None, help="comma list of sample keys / question ids")
    g.add_argument("--first", type=int, default=4, help="the first N samples (default 4)")
    ap.add_argument("--stage", type=int, default=None, help="latent stage (default: max_latent_stage)")
    ap.add_argument("--topk", type=int, default=5)
    ap.add_argument("--dummy", action="store_true", help="the dummy view: latent inputs replaced (eval.dummy_latent)")
    ap.add_argument("--out", default=None, help="output dir (default: <ckpt>/latents)")
    ap.add_argument("--tag", default=None)
    args, rest = ap.parse_known_args(argv)
    import torch

    from mmcoconut.eval.latents import decode_thoughts, format_thoughts, plot_thoughts
    from mmcoconut.export.hf_export import load_any

    try:
        model, tok, improc, cfg, info = load_any(args.ckpt, tag=args.tag, overrides=rest)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.eval()
    stage = cfg.curriculum.max_latent_stage if args.stage is None else args.stage
    try:
        rows = read_rows(args.shards, tok, improc, cfg, model.n_image_tokens, stage,
                         args.keys.split(",") if args.keys else None, args.first)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.train.seed)
    samples = []
    for row in rows:
        meta = row["meta"]
        thoughts = decode_thoughts(model, tok, row, list(meta.get("steps") or []), cfg.curriculum.c_thought,
                                   args.topk, dummy_latent=cfg.eval.dummy_latent if args.dummy else None)
        samples.append({"key": row["question_id"], "question": meta.get("raw_question", meta["question"]),
                        "steps": meta.get("steps"), "answer": meta.get("answer"), "n_latents": row["n_latents"],
                        "thoughts": thoughts})
        print(format_thoughts(row["question_id"], samples[-1]["question"], thoughts), flush=True)
    out = Path(args.out) if args.out else Path(info.get("export") or info.get("root", args.ckpt)) / "latents"
    out.mkdir(parents=True, exist_ok=True)
    (out / "latents.json").write_text(json.dumps({"checkpoint": info["checkpoint"], "stage": stage,
                                                  "c_thought": cfg.curriculum.c_thought, "samples": samples},
                                                 indent=1))
    try:
        png = plot_thoughts(samples, out / "latents.png")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"inspect_latents: wrote {png} and {out / 'latents.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
