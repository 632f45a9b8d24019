#!/usr/bin/env python
"""Write tiny random GPT-2 / CLIP-vision / tokenizer dirs (no download): python tools/make_tiny_models.py OUT."""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcoconut.tiny_models import PRESETS, make_tiny_models  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default="models/tiny", help="output dir (default: models/tiny)")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if the dir is up to date")
    ap.add_argument("--task", choices=("shapes", "chain"), default="shapes",
                    help="the synthetic task whose texts train the tokenizer (default: shapes, the demo's)")
    args = ap.parse_args(argv)
    texts = None
    if args.task == "chain":
        from mmcoconut.data.chain import chain_texts
        texts = chain_texts(2000, args.seed, "1-4")
    dirs = make_tiny_models(args.out, args.preset, texts=texts, seed=args.seed, force=args.force)
    print(f"tiny models: lm={dirs['lm']} vision={dirs['vision']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
