"""`python -m mmcoconut.kernels [cpu|cuda|all]`: build the injection extensions ahead of time (make install)."""
import sys

from .build import main

sys.exit(main())
