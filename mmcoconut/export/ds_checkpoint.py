"""Training checkpoints -> an MMCoconut in one CPU process (no launcher, no process group): DeepSpeed's of any
ZeRO stage, and FSDP2's DCP checkpoints (dcp_checkpoint.py).

`find_checkpoint(path)` accepts a run dir, a checkpoint root (with `latest`) or a tag dir; `load_checkpoint(path)`
consolidates the weights to fp32 (DeepSpeed's get_fp32_state_dict_from_zero_checkpoint; ZeRO-0: the module weights
in the model-states file; DCP: resharded to whole tensors) and takes the resolved config from the checkpoint's
client_state (or config.yaml).
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional

import torch

from .dcp_checkpoint import dcp_config, dcp_state_dict, is_dcp_checkpoint


def _has_model_states(d: Path) -> bool:
    return bool(glob.glob(str(d / "*model_states.pt"))) or is_dcp_checkpoint(d)


def _latest_tag(root: Path) -> str:
    """The tag `latest` names; when it is garbled or names no tag dir (the trainer does not resume from it either),
    the newest complete checkpoint by step, with a warning."""
    from mmcoconut.train.checkpoint.index import complete_tags  # the trainer's rule (resume: newest by step)

    try:
        t = (root / "latest").read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        t = None
    if t and "/" not in t and (root / t).is_dir():
        return t
    tags = complete_tags(root)
    if not tags:
        raise FileNotFoundError(f"checkpoint {root}: 'latest' names {t!r}, which does not exist, and no complete "
                                "checkpoint is there")
    print(f"warning: {root}/latest is garbled or names no checkpoint ({t!r}): using the newest complete one, "
          f"{tags[-1]}", flush=True)
    return tags[-1]


def find_checkpoint(path, tag: Optional[str] = None) -> tuple[Path, str]:
    """(checkpoint root holding `latest`/tag dirs, tag) for a root dir, a tag dir or a run dir above the root."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if tag is not None:
        if (p / tag).is_dir():
            return p, tag
        raise FileNotFoundError(f"checkpoint {p}: no tag dir {tag!r} (tags: {_tags(p)})")
    if _has_model_states(p):
        return p.parent, p.name
    if (p / "latest").is_file():
        return p, _latest_tag(p)
    roots = sorted({Path(f).parent for f in glob.glob(str(p / "**" / "latest"), recursive=True)})
    if len(roots) == 1:
        return find_checkpoint(roots[0])
    if len(roots) > 1:
        raise ValueError(f"{p}: several checkpoint dirs {[str(r) for r in roots]}; pass one of them")
    tags = _tags(p)
    if tags:
        raise ValueError(f"{p}: no 'latest' file; pass a tag dir, one of {tags}")
    raise FileNotFoundError(f"{p}: not a training checkpoint (no 'latest' file, no *model_states.pt, no DCP "
                            ".metadata)")


def _tags(p: Path) -> list[str]:
    return sorted(x.name for x in p.iterdir() if x.is_dir() and _has_model_states(x)) if p.is_dir() else []


def _model_states_file(tag_dir: Path) -> Path:
    files = sorted(glob.glob(str(tag_dir / "*model_states.pt")))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no *model_states.pt")
    return Path(files[0])


def _config_in(obj, depth: int = 0) -> Optional[dict]:
    """A resolved config dict (has 'model' and 'curriculum' sections) inside a client_state."""
    if isinstance(obj, str) and depth > 0 and "curriculum" in obj:
        import yaml
        try:
            obj = yaml.safe_load(obj)
        except yaml.YAMLError:
            return None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("model"), dict) and isinstance(obj.get("curriculum"), dict):
        return obj
    if depth < 2:
        for k, v in obj.items():
            if k in ("module", "optimizer", "lr_scheduler", "buffer_names", "param_shapes"):
                continue
            found = _config_in(v, depth + 1)
            if found is not None:
                return found
    return None


def checkpoint_config(root: Path, tag: str) -> tuple[dict, dict]:
    """(resolved config dict, model-states dict) of a checkpoint: client_state first, then config.yaml files.
    An FSDP2 (DCP) checkpoint has no model-states dict: (config, None)."""
    if is_dcp_checkpoint(root / tag):
        return dcp_config(root / tag), None
    states = torch.load(_model_states_file(root / tag), map_location="cpu", weights_only=False)
    found = _config_in(states)
    if found is None:
        import yaml
        for d in (root / tag, root, root.parent, root.parent.parent):
            if (d / "config.yaml").is_file():
                found = yaml.safe_load((d / "config.yaml").read_text())
                break
    if found is None:
        raise ValueError(f"{root / tag}: no resolved config in the client_state and no config.yaml nearby")
    return found, states


def consolidated_state_dict(root: Path, tag: str, states: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """fp32 module state dict of any ZeRO stage (0: the module weights stored in the model-states file)."""
    tag_dir = root / tag
    if is_dcp_checkpoint(tag_dir):
        return dcp_state_dict(tag_dir)
    if glob.glob(str(tag_dir / "*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:  # ZeRO-0: no partitioned optimizer files; the full module sits in the model-states file
        states = states if states is not None else torch.load(_model_states_file(tag_dir), map_location="cpu",
                                                               weights_only=False)
        sd = states["module"]
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v.float() if torch.is_floating_point(v) else v
    return out


def load_checkpoint(path, tag: Optional[str] = None, overrides: Optional[list[str]] = None, device="cpu"):
    """(model, tokenizer, image_processor, cfg, info) from a DeepSpeed or FSDP2 checkpoint (root, tag or run dir).

    Parameters absent from the checkpoint (frozen vision tower saved with exclude_frozen_parameters) keep the
    weights `build_model` loaded from cfg.model.vision_id; anything else missing is an error.
    """
    from ..config import load_config
    from ..factory import build_image_processor, build_model, build_tokenizer
    from ..model_paths import resolve_model_paths

    root, tag = find_checkpoint(path, tag)
    cfg_dict, states = checkpoint_config(root, tag)
    cfg = load_config(data=cfg_dict, overrides=overrides)
    # model paths are recorded absolute; older runs recorded them relative to where training ran (often the run
    # dir's parent): try the caller's dir, then the run dir and its parents
    bases = [Path.cwd(), *Path(root).resolve().parents]
    resolve_model_paths(cfg.model, bases, keys=("lm_id", "vision_id", "tokenizer_id"))
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer)
    sd = consolidated_state_dict(root, tag, states)
    del states
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm.lm_head.weight"}
    frozen_vision = [k for k in missing if k.startswith("vision.")]
    other = [k for k in missing if k not in tied and not k.startswith("vision.")]
    if frozen_vision and not cfg.model.freeze_vision:
        other += frozen_vision
    if other or unexpected:
        raise RuntimeError(f"checkpoint {root / tag} does not match the model built from its config: "
                           f"missing {other[:5]}{'...' if len(other) > 5 else ''}, unexpected {unexpected[:5]}")
    model.to(device).eval()
    info = {"root": str(root), "tag": tag, "checkpoint": str(root / tag),
            "reloaded_from_vision_id": bool(frozen_vision)}
    return model, tokenizer, build_image_processor(cfg.model), cfg, info


__all__ = ["find_checkpoint", "checkpoint_config", "consolidated_state_dict", "load_checkpoint"]
