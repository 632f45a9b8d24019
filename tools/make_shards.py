#!/usr/bin/env python
"""Write WebDataset shards: the same command as the console script mmcoconut-shard (mmcoconut/cli/shard.py),
runnable from a checkout without installing. `python tools/make_shards.py --help` lists the sources and options."""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmcoconut.cli.shard import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
