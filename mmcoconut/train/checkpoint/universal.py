"""Convert a run's checkpoint to a DeepSpeed universal checkpoint, so it resumes on another number of ranks.

    python -m mmcoconut.cli.universal RUN_DIR [--tag TAG]

Writes RUN_DIR/<TAG>_universal (DeepSpeed's ds_to_universal; ZeRO-1/2 with --inject_missing_state) into a temp
dir renamed when complete, holding the run-dir lock (refused while a training run uses the dir). Then run
training again with the same run dir and a ds_config for the new world size (same global batch, e.g.
ds_configs/zero2_1gpu.json): `resume: auto` sees the world-size change and loads the universal copy
(`"checkpoint": {"load_universal": true}`). ZeRO-3 <-> ZeRO-1/2 is not convertible and is refused.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from mmcoconut.config import ConfigError

from .index import UNIVERSAL_SUFFIX, list_tags, read_meta
from .lock import RunLock


def convert(run_dir: str, tag: str | None = None) -> Path:
    try:
        with RunLock(run_dir, what="checkpoint conversion"):
            return _convert(run_dir, tag)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def _convert(run_dir: str, tag: str | None = None) -> Path:
    run = Path(run_dir)
    tags = list_tags(run)
    if not tags:
        raise SystemExit(f"{run}: no complete checkpoint (expected {run}/checkpoints.json and <tag>/mmcoconut.json)")
    tag = tag or tags[-1]
    if tag not in tags:
        raise SystemExit(f"{run}: no complete checkpoint {tag!r} (have: {tags})")
    meta = read_meta(run, tag)
    out = run / (tag + UNIVERSAL_SUFFIX)
    tmp = run / (tag + UNIVERSAL_SUFFIX + ".tmp")  # removed by the next training start if this process dies
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(run / tag),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    if meta["zero_stage"] in (1, 2):
        cmd.append("--inject_missing_state")
    if meta["zero_stage"] == 0:
        raise SystemExit("ZeRO-0 checkpoints hold the full optimizer state on every rank: resume them directly")
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (run / "latest_universal").write_text(out.name)  # ds_to_universal named the temp dir there
    print(f"universal checkpoint: {out}\nresume on any number of ranks with the same run dir "
          f"({run}) and a ZeRO-{meta['zero_stage']} ds_config for that world size; "
          f"checkpoint.resume=auto picks it up (or --checkpoint.resume=universal:{tag}).")
    return out
