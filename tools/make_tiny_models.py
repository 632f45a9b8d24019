#!/usr/bin/env python
"""Write tiny random LM / vision-tower / tokenizer dirs (no download): python tools/make_tiny_models.py OUT
[--arch gpt2|llama|qwen2|mistral] [--vision clip|siglip]."""
import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcoconut.tiny_models import ARCHS, PRESETS, VISIONS, make_tiny_models  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default="models/tiny", help="output dir (default: models/tiny)")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="gpt2", choices=ARCHS, help="language-model family (default: gpt2)")
    ap.add_argument("--vision", default="clip", choices=VISIONS, help="vision tower (default: clip)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the dir is up to date")
    ap.add_argument("--task", choices=("shapes", "chain"), default="shapes",
                    help="the synthetic task whose texts train the tokenizer (default: shapes, the demo's)")
    args = ap.parse_args(argv)
    texts = None
    if args.task == "chain":
        from mmcoconut.data.chain import chain_texts
        texts = chain_texts(2000, args.seed, "1-4")
    dirs = make_tiny_models(args.out, args.preset, texts=texts, seed=args.seed, force=args.force, arch=args.arch,
                            vision=args.vision)
    print(f"tiny models ({args.arch} + {args.vision}): lm={dirs['lm']} vision={dirs['vision']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
