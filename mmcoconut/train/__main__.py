"""`python -m mmcoconut.train`: the documented alias of mmcoconut-train (mmcoconut/cli/train.py)."""
import sys

from mmcoconut.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
