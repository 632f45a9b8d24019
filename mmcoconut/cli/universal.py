"""`python -m mmcoconut.cli.universal RUN_DIR [--tag TAG]`: convert a run's checkpoint to a DeepSpeed universal
checkpoint, so it resumes on another number of ranks (mmcoconut/train/checkpoint/universal.py says how)."""
from __future__ import annotations

import argparse
import sys

from mmcoconut.train.checkpoint import universal


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=universal.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--tag", help="checkpoint tag (default: the newest complete one)")
    args = ap.parse_args(argv)
    universal.convert(args.run_dir, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
