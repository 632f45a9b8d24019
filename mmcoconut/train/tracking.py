"""Run tracking on rank 0: <run_dir>/metrics.jsonl (schema: docs/internals.md), config.yaml, optional wandb.

wandb never prompts or blocks: the mode is WANDB_MODE (env wins) > logging.wandb_mode > "online" when an API key
is configured (WANDB_API_KEY or a netrc entry for api.wandb.ai) > "offline".
The wandb run id is kept in <run_dir>/wandb_run_id: a resumed run continues the same wandb run (resume="allow"),
a fresh start in the run dir begins a new one. WANDB_RUN_ID in the environment wins.
config.yaml is never overwritten silently: a different one is moved to config_history/ first (drift.py).
"""
from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import time
from pathlib import Path
from typing import Optional

WANDB_ID_FILE = "wandb_run_id"

def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg) -> str:
    return os.environ.get("WANDB_MODE") or cfg.logging.wandb_mode or ("online" if _has_wandb_key() else "offline")


def _clean(v):
    """JSON-safe scalars: non-finite floats become null (metrics.jsonl stays valid JSON)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class Tracker:
    """Writes records on rank 0; a no-op elsewhere. `log(kind, **fields)` adds "kind" and "time"."""

    def __init__(self, cfg, rank: int, resumed: bool = False):
        self.enabled = rank == 0
        self.run = None
        self.config_moved, self.config_changes = None, {}
        if not self.enabled:
            return
        from .checkpoint.drift import write_config

        self.dir = Path(cfg.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_moved, self.config_changes = write_config(self.dir, cfg)
        self.file = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if cfg.logging.report_to == "wandb":
            self.run = self._init_wandb(cfg, resumed)

    def _init_wandb(self, cfg, resumed: bool):
        os.environ.setdefault("WANDB_SILENT", "true")
        mode = wandb_mode(cfg)
        if mode == "disabled":
            return None
        import wandb

        from .checkpoint.index import atomic_write

        id_file = self.dir / WANDB_ID_FILE
        run_id = os.environ.get("WANDB_RUN_ID")
        if not run_id and resumed and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        run_id = run_id or secrets.token_hex(6)
        atomic_write(id_file, run_id + "\n")
        run = wandb.init(project=os.environ.get("WANDB_PROJECT") or cfg.logging.project,
                         entity=os.environ.get("WANDB_ENTITY") or cfg.logging.entity, id=run_id,
                         name=cfg.train.name, dir=str(self.dir), mode=mode, resume="allow",
                         settings=wandb.Settings(silent=True, console="off", init_timeout=60))
        run.config.update(cfg.to_dict(), allow_val_change=True)  # a resume may carry allowed config changes
        return run

    def log(self, kind: str, **fields) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, **{k: _clean(v) for k, v in fields.items()}, "time": round(time.time(), 3)}
        self.file.write(json.dumps(rec) + "\n")
        if self.run is not None:
            step = fields.get("step")
            data = {f"{kind}/{k}": v for k, v in rec.items()
                    if k not in ("kind", "time", "step") and isinstance(v, (int, float)) and v is not None}
            self.run.log(data, step=step if isinstance(step, int) else None)

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(run_dir: str, kind: Optional[str] = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [r for r in recs if kind is None or r["kind"] == kind]
