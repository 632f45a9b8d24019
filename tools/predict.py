#!/usr/bin/env python
"""Predict with a trained model (no DeepSpeed): python tools/predict.py MODEL INPUT OUT.json (= mmcoconut-predict)."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcoconut.cli.predict import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
