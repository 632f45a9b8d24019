"""`python -m mmcoconut.cli.build_ops [cpu|cuda|all]`: build the injection extensions ahead of time (make install)."""
import sys

from mmcoconut.kernels.build import main

if __name__ == "__main__":
    sys.exit(main())
