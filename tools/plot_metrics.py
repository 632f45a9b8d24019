#!/usr/bin/env python
"""Plot a run's metrics.jsonl: ``python tools/plot_metrics.py RUN_DIR [--out DIR]`` (core: mmcoconut.eval.plots)."""

import argparse
import os
import sys

if __package__ in (None, ""):  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmcoconut.eval.plots import plot_run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output directory for the PNGs (default: RUN_DIR)")
    args = p.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
