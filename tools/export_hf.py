#!/usr/bin/env python
"""Export a DeepSpeed checkpoint (ZeRO 0/1/2/3, any number of ranks) to a Hugging Face dir, in one CPU process.

python tools/export_hf.py CKPT OUT [--tag T] [--key=value ...]

CKPT: run dir, checkpoint root (with 'latest') or tag dir. Weights are consolidated to fp32 with DeepSpeed's
get_fp32_state_dict_from_zero_checkpoint; a frozen vision tower left out of the checkpoint is reloaded from
model.vision_id. OUT gets lm/ (GPT-2 + tokenizer), projector.safetensors, vision/ (if tuned),
vision_processor/ and mmcoconut.json; load it with mmcoconut.model.export.load_export (no DeepSpeed needed).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation runs on the CPU, on any machine


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    args, overrides = ap.parse_known_args(argv)
    from mmcoconut.config import ConfigError
    from mmcoconut.model.export import load_checkpoint, save_export

    try:
        model, tok, improc, cfg, info = load_checkpoint(args.ckpt, tag=args.tag, overrides=overrides)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = save_export(model, tok, cfg, args.out, image_processor=improc)
    n = sum(p.numel() for p in model.parameters())
    vision = "tuned, saved to vision/" if not cfg.model.freeze_vision else f"frozen, referenced: {cfg.model.vision_id}"
    print(f"export: {info['checkpoint']} -> {out} ({n / 1e6:.2f}M parameters; vision {vision})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
