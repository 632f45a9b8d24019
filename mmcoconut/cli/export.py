"""mmcoconut-export CKPT OUT [--tag T] [--eval-results FILE] [--push-to-hub REPO] [--key=value ...]

Write a DeepSpeed checkpoint (ZeRO 0/1/2/3, any number of ranks; run dir, checkpoint root or tag dir) as one
self-contained Hugging Face directory, in one CPU process: weights consolidated to fp32 (DeepSpeed's
get_fp32_state_dict_from_zero_checkpoint; a frozen vision tower left out of the checkpoint is reloaded from
model.vision_id and saved too), tokenizer, image processor, the model code and a model card. CKPT may also be an
export (re-export, e.g. to push it). The four-view table of `mmcoconut-eval` on the same checkpoint goes into the
model card (found next to the checkpoint, or --eval-results). Load the result with
`AutoModel.from_pretrained(OUT, trust_remote_code=True)`, no mmcoconut needed.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation runs on the CPU, on any machine
    ap = argparse.ArgumentParser(prog="mmcoconut-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="run dir, checkpoint root, tag dir, or an export")
    ap.add_argument("out", help="output directory (replaced atomically)")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    ap.add_argument("--eval-results", default=None, metavar="FILE",
                    help="eval_results.json for the model card (default: the one mmcoconut-eval wrote for this "
                         "checkpoint, if any)")
    ap.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload the export to this Hub repo")
    args, overrides = ap.parse_known_args(argv)
    from mmcoconut.config import ConfigError
    from mmcoconut.modeling.card import read_eval_results
    from mmcoconut.export.hf_export import find_eval_results, is_export, load_checkpoint, load_hf, save_hf, to_hf

    try:
        if is_export(args.ckpt):
            hf, source = load_hf(args.ckpt), args.ckpt
        else:
            model, tok, improc, cfg, info = load_checkpoint(args.ckpt, tag=args.tag, overrides=overrides)
            results = read_eval_results(args.eval_results) if args.eval_results else \
                find_eval_results(info["checkpoint"], cfg.run_dir)
            hf, source = to_hf(model, tok, improc, cfg, results), info["checkpoint"]
        if args.eval_results and is_export(args.ckpt):
            hf.config.eval_results = read_eval_results(args.eval_results)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_hf(hf, args.out)
    n = sum(p.numel() for p in hf.parameters())
    table = "with" if hf.config.eval_results else "without"
    print(f"export: {source} -> {out} ({n / 1e6:.2f}M parameters, model card {table} an eval table)")
    if args.push_to_hub:
        info = hf.push_to_hub(args.push_to_hub)
        print(f"pushed: {getattr(info, 'commit_url', info)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
