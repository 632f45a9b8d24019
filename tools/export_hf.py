#!/usr/bin/env python
"""Export a DeepSpeed checkpoint to a Hugging Face dir: python tools/export_hf.py CKPT OUT (= mmcoconut-export)."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmcoconut.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
