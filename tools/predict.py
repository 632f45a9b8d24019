#!/usr/bin/env python
"""Predict with an exported model (no DeepSpeed): official A-OKVQA predictions file, metrics if answers exist.

python tools/predict.py EXPORT SHARDS OUT.json [--view coconut] [--batch-size B] [--stage K | --n-latents N]
                        [--max-samples N] [--annotations FILE] [--device D]
Metrics cover every question the shards declare (or the annotation file holds); a missing one scores 0.
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
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--stage", type=int, default=None, help="per-sample latents at stage K (default: the last)")
    g.add_argument("--n-latents", type=int, default=None, help="one latent count for every prompt")
    ap.add_argument("--annotations", default=None, help="official annotation json: the expected question set")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    import torch

    from mmcoconut.eval.evaluate import generate_view
    from mmcoconut.eval.expected import expected_set
    from mmcoconut.eval.metrics import save_predictions
    from mmcoconut.eval.scoring import latent_summary, score_rows
    from mmcoconut.model.export import load_export

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, tok, improc, cfg = load_export(args.export, device=device)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.train.seed)
    try:
        expected = expected_set(args.shards, args.max_samples, args.annotations)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, secs = generate_view(model, tok, improc, cfg, args.shards, args.view, args.n_latents,
                               batch_size=args.batch_size, max_samples=args.max_samples, stage=args.stage,
                               progress=True)
    s = score_rows(rows, expected)
    save_predictions(args.out, s["preds"])
    print(f"predict: {s['n_generated']} generated of {s['n_expected']} expected ({s['n_missing']} missing: "
          f"{s['missing'] or 'none'}), view {args.view}, latents {latent_summary(s['latents'])}, "
          f"{s['n_generated'] / max(secs, 1e-9):.1f} samples/s, {s['empty']} empty, {s['fallback']} fuzzy "
          f"fallbacks -> {args.out}")
    if s["mc"] is not None or s["da"] is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"MC {fmt(s['mc'])} (n={s['n_mc']})  DA {fmt(s['da'])} (n={s['n_da']})")
    if s["note"]:
        print(f"note: {s['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
