"""Which checkpoint a run resumes from, decided before any engine exists (DeepSpeed's universal load is a
ds_config switch), and the config-drift check against it (drift.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mmcoconut.config import ConfigError
from mmcoconut.model_paths import resolved_section

from . import drift
from .index import UNIVERSAL_SUFFIX, list_tags, read_meta


@dataclass
class ResumePoint:
    tag: str
    universal: bool  # DeepSpeed: load `<run_dir>/<tag>_universal` (converted) with load_universal
    meta: dict  # the checkpoint's META (index.py)
    notes: list = field(default_factory=list)  # harmless / allowed config changes, printed on rank 0

    @property
    def load_tag(self) -> str:
        return self.tag + UNIVERSAL_SUFFIX if self.universal else self.tag


def _check_drift(cfg, run_dir: Path, tag: str, meta: dict, micro: Optional[int], world: int) -> list[str]:
    """ConfigError for changes of the model / data / curriculum (drift.py); notes for the rest."""
    old = meta.get("config")
    if old is None and (run_dir / "config.yaml").is_file():  # checkpoints from before META carried the config
        import yaml
        old = yaml.safe_load((run_dir / "config.yaml").read_text())
    if not isinstance(old, dict):
        return [f"{run_dir / tag} records no config: config drift not checked"]
    old = {s: dict(v) for s, v in old.items() if isinstance(v, dict)}
    old["model"] = resolved_section(old.get("model", {}))  # relative model paths of older runs, as now recorded
    new = cfg.to_dict()
    old.setdefault("train", {})
    if meta.get("world_size") != world or micro is None:  # elastic: accumulation (and micro) are re-derived
        old["train"]["micro_batch_size"] = new["train"]["micro_batch_size"]
    elif meta.get("micro_batch_size") is not None:  # compare the micro-batch size in effect (ds_config or override)
        old["train"]["micro_batch_size"], new["train"]["micro_batch_size"] = meta["micro_batch_size"], micro
    return drift.check(old, new, cfg.checkpoint.allow_config_change, f"{run_dir / tag}")


def _tag_of(r, tags: list[str], run_dir: Path) -> Optional[str]:
    """checkpoint.resume -> a tag (None: fresh start)."""
    if r in ("none", 0, "0"):
        return None
    if r == "auto" or r == "universal":
        if not tags and r == "universal":
            raise ConfigError(f"checkpoint.resume=universal: no complete checkpoint in {run_dir}")
        return tags[-1] if tags else None
    if isinstance(r, str) and r.startswith("universal"):
        return r.split(":", 1)[1]
    if isinstance(r, int) or (isinstance(r, str) and r.isdigit()):
        return f"epoch{int(r):03d}"
    return r


def find_resume(cfg, world: int, zero_stage: Optional[int] = None, micro: Optional[int] = None
                ) -> Optional[ResumePoint]:
    """checkpoint.resume: auto (newest complete, fresh start if none) | none | 0 (fresh) | N (end of epoch N) |
    <tag> | universal[:<tag>] (DeepSpeed: the converted copy written by `python -m mmcoconut.cli.universal`).
    DeepSpeed loads a checkpoint from another world size through its universal copy (automatically when it
    exists); FSDP2's DCP checkpoints reshard on load. A checkpoint of the other engine is refused."""
    run_dir, r = Path(cfg.run_dir), cfg.checkpoint.resume
    tags = list_tags(run_dir)
    tag = _tag_of(r, tags, run_dir)
    if tag is None:
        return None
    if tag not in tags:
        raise ConfigError(f"checkpoint.resume={r!r}: no complete checkpoint {tag!r} in {run_dir} "
                          f"(have: {tags or 'none'})")
    meta = read_meta(run_dir, tag)
    engine, saved_by = cfg.train.engine, meta.get("engine", "deepspeed")
    if saved_by != engine:
        raise ConfigError(f"checkpoint {run_dir / tag} was saved by the {saved_by} engine; it cannot be resumed with "
                          f"train.engine={engine}. Resume with --train.engine={saved_by}, or export it "
                          "(mmcoconut-export) and start a new run from it with model.init_from")
    want_universal = isinstance(r, str) and r.startswith("universal")
    if engine == "fsdp2":
        if want_universal:
            raise ConfigError(f"checkpoint.resume={r!r}: universal checkpoints are DeepSpeed's; FSDP2 checkpoints "
                              "load on any number of ranks as they are")
        return ResumePoint(tag, False, meta, _check_drift(cfg, run_dir, tag, meta, micro, world))
    stages = {meta.get("zero_stage"), zero_stage}
    if 3 in stages and len(stages) > 1:
        raise ConfigError(f"checkpoint {run_dir / tag} was saved with ZeRO-{meta.get('zero_stage')}; it cannot be "
                          f"resumed with ZeRO-{zero_stage} (DeepSpeed's universal checkpoints do not convert "
                          "between ZeRO-3 and ZeRO-1/2). Use a ds_config of the same stage.")
    if meta.get("world_size") != world or want_universal:
        conv = run_dir / (tag + UNIVERSAL_SUFFIX)
        if not (conv / "zero").is_dir():
            raise ConfigError(
                f"checkpoint {run_dir / tag} was saved by {meta.get('world_size')} process(es), this run has {world}: "
                f"convert it once with `python -m mmcoconut.cli.universal {run_dir} --tag {tag}`, then run "
                "again (it is picked up automatically)")
        return ResumePoint(tag, True, meta, _check_drift(cfg, run_dir, tag, meta, None, world))
    return ResumePoint(tag, False, meta, _check_drift(cfg, run_dir, tag, meta, micro, world))
