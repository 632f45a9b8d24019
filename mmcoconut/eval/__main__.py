"""`python -m mmcoconut.eval`: the documented alias of mmcoconut-eval (mmcoconut/cli/eval.py)."""
import sys

from mmcoconut.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
