#!/usr/bin/env python
"""Predict with an exported model (no DeepSpeed): official A-OKVQA predictions file, metrics if answers exist.

python tools/predict.py EXPORT SHARDS OUT.json [--view coconut] [--batch-size B] [--n-latents N]
                        [--max-samples N] [--device D]
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export")
    ap.add_argument("shards")
    ap.add_argument("out", help="predictions json {question_id: {multiple_choice, direct_answer}}")
    ap.add_argument("--view", default="coconut", choices=["nocot", "cot", "coconut", "dummy"])
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--n-latents", type=int, default=None, help="default: max_latent_stage * c_thought")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    import torch

    from mmcoconut.eval.evaluate import default_n_latents, generate_view, score_rows
    from mmcoconut.eval.metrics import save_predictions
    from mmcoconut.model.export import load_export

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok, improc, cfg = load_export(args.export, device=device)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_lat = default_n_latents(cfg) if args.n_latents is None else args.n_latents
    torch.manual_seed(cfg.train.seed)
    rows, secs = generate_view(model, tok, improc, cfg, args.shards, args.view, n_lat,
                               batch_size=args.batch_size, max_samples=args.max_samples)
    s = score_rows(rows)
    save_predictions(args.out, s["preds"])
    print(f"predict: {s['n']} questions, view {args.view}, {n_lat} latents, {s['n'] / max(secs, 1e-9):.1f} "
          f"samples/s, {s['fallback']} fuzzy fallbacks -> {args.out}")
    if s["mc"] is not None or s["da"] is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"MC {fmt(s['mc'])} (n={s['n_mc']})  DA {fmt(s['da'])} (n={s['n_da']})")
    if s["note"]:
        print(f"note: {s['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
