"""Hugging Face export of an MMCoconut model, and loading models from exports or DeepSpeed checkpoints.

Export layout (`save_export`):
  out/lm/                     GPT-2 `save_pretrained` (safetensors; tied wte/lm_head) + the tokenizer
  out/projector.safetensors   projector weights (out/extra.safetensors: any other MMCoconut parameters)
  out/vision/                 CLIP vision `save_pretrained`, only when the vision tower was tuned
  out/vision_processor/       the image processor
  out/mmcoconut.json          model config section, curriculum (c_thought, max_latent_stage), vision id/dir,
                              the full resolved run config
`load_export(dir)` rebuilds (model, tokenizer, image_processor, cfg) without DeepSpeed.
`load_checkpoint(path)` does the same from a DeepSpeed checkpoint of any ZeRO stage (fp32 consolidation in one
process, config from the checkpoint's client_state or the run dir's config.yaml).
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Optional

import torch

EXPORT_META = "mmcoconut.json"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- export
def _split_state(model) -> dict[str, dict[str, torch.Tensor]]:
    """Model state dict -> {"projector": {...}, "extra": {...}} (lm/vision go through save_pretrained)."""
    out = {"projector": {}, "extra": {}}
    for k, v in model.state_dict().items():
        if k.startswith("projector."):
            out["projector"][k[len("projector."):]] = v.detach().cpu().contiguous()
        elif not k.startswith(("lm.", "vision.")):
            out["extra"][k] = v.detach().cpu().contiguous()
    return out


def _vision_ref(vision_id: str) -> str:
    """A local vision dir as an absolute path (the export must not depend on the cwd); hub ids unchanged."""
    return str(Path(vision_id).resolve()) if Path(vision_id).is_dir() else vision_id


def save_export(model, tokenizer, cfg, out_dir, image_processor=None) -> Path:
    """Write the export described in the module docstring; returns the output dir."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(out / "lm", safe_serialization=True)
    tokenizer.save_pretrained(out / "lm")
    parts = _split_state(model)
    save_file(parts["projector"], str(out / "projector.safetensors"))
    if parts["extra"]:
        save_file(parts["extra"], str(out / "extra.safetensors"))
    tuned = not cfg.model.freeze_vision
    if tuned:
        model.vision.save_pretrained(out / "vision", safe_serialization=True)
    if image_processor is None:
        from . import build_image_processor
        image_processor = build_image_processor(cfg.model)
    image_processor.save_pretrained(out / "vision_processor")
    meta = {
        "format_version": FORMAT_VERSION,
        "lm": "lm", "tokenizer": "lm", "projector": "projector.safetensors",
        "extra": "extra.safetensors" if parts["extra"] else None,
        "vision": {"tuned": tuned, "path": "vision" if tuned else _vision_ref(cfg.model.vision_id),
                   "source_id": cfg.model.vision_id},
        "image_processor": "vision_processor",
        "n_image_tokens": int(getattr(model, "n_image_tokens", 0)),
        "model": dict(cfg.to_dict()["model"]),
        "curriculum": {"c_thought": cfg.curriculum.c_thought, "max_latent_stage": cfg.curriculum.max_latent_stage},
        "config": cfg.to_dict(),
    }
    (out / EXPORT_META).write_text(json.dumps(meta, indent=1))
    return out


def is_export(path) -> bool:
    """An export dir (a checkpoint tag dir also holds an mmcoconut.json, but no lm/ and no projector file)."""
    d = Path(path)
    return (d / EXPORT_META).is_file() and (d / "lm").is_dir() and (d / "projector.safetensors").is_file()


def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained dir (single or sharded safetensors)."""
    from safetensors.torch import load_file

    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    sd = {}
    for f in files:
        sd.update(load_file(str(d / f)))
    return sd


def load_export(export_dir, device="cpu"):
    """(model, tokenizer, image_processor, cfg) from a `save_export` dir; the model is in eval mode."""
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor

    from ..config import config_from_dict
    from . import build_model, build_tokenizer

    d = Path(export_dir)
    if not is_export(d):
        raise FileNotFoundError(f"{d}: not an mmcoconut export (no {EXPORT_META}); "
                                "make one with tools/export_hf.py CKPT OUT")
    meta = json.loads((d / EXPORT_META).read_text())
    cfg = config_from_dict(meta["config"])
    cfg.model.lm_id = str(d / meta["lm"])
    cfg.model.tokenizer_id = str(d / meta["tokenizer"])
    v = meta["vision"]
    cfg.model.vision_id = str(d / v["path"]) if v["tuned"] else v["path"]
    tokenizer = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tokenizer)
    # Reload the saved LM tensors explicitly: build_model may (re)initialise new-token rows.
    lm_sd = _read_hf_weights(d / meta["lm"])
    missing, unexpected = model.lm.load_state_dict(lm_sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to transformer.wte
    if missing or unexpected:
        raise RuntimeError(f"{d / meta['lm']}: LM weights do not match (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    model.projector.load_state_dict(load_file(str(d / meta["projector"])), strict=True)
    if meta.get("extra"):
        missing, unexpected = model.load_state_dict(load_file(str(d / meta["extra"])), strict=False)
        if unexpected:
            raise RuntimeError(f"{d / meta['extra']}: unexpected tensors {unexpected[:5]}")
    image_processor = CLIPImageProcessor.from_pretrained(str(d / meta["image_processor"]))
    model.to(device).eval()
    return model, tokenizer, image_processor, cfg


# ----------------------------------------------------------------------------------- DeepSpeed checkpoints
def _has_model_states(d: Path) -> bool:
    return bool(glob.glob(str(d / "*model_states.pt")))


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
        t = (p / "latest").read_text().strip()
        if not (p / t).is_dir():
            raise FileNotFoundError(f"checkpoint {p}: 'latest' names {t!r}, which does not exist")
        return p, t
    roots = sorted({Path(f).parent for f in glob.glob(str(p / "**" / "latest"), recursive=True)})
    if len(roots) == 1:
        return find_checkpoint(roots[0])
    if len(roots) > 1:
        raise ValueError(f"{p}: several checkpoint dirs {[str(r) for r in roots]}; pass one of them")
    tags = _tags(p)
    if tags:
        raise ValueError(f"{p}: no 'latest' file; pass a tag dir, one of {tags}")
    raise FileNotFoundError(f"{p}: not a DeepSpeed checkpoint (no 'latest' file, no *model_states.pt)")


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
    """(resolved config dict, model-states dict) of a checkpoint: client_state first, then config.yaml files."""
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
    """(model, tokenizer, image_processor, cfg, info) from a DeepSpeed checkpoint (root, tag or run dir).

    Parameters absent from the checkpoint (frozen vision tower saved with exclude_frozen_parameters) keep the
    weights `build_model` loaded from cfg.model.vision_id; anything else missing is an error.
    """
    from ..config import load_config
    from . import build_image_processor, build_model, build_tokenizer

    root, tag = find_checkpoint(path, tag)
    cfg_dict, states = checkpoint_config(root, tag)
    cfg = load_config(data=cfg_dict, overrides=overrides)
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


def load_any(path, tag: Optional[str] = None, overrides: Optional[list[str]] = None, device="cpu"):
    """An export dir or a DeepSpeed checkpoint -> (model, tokenizer, image_processor, cfg, info)."""
    if is_export(path):
        model, tok, ip, cfg = load_export(path, device=device)
        if overrides:
            from ..config import load_config
            cfg = load_config(data=cfg.to_dict(), overrides=overrides)
        return model, tok, ip, cfg, {"export": str(path), "checkpoint": str(path)}
    return load_checkpoint(path, tag=tag, overrides=overrides, device=device)


__all__ = ["save_export", "load_export", "load_checkpoint", "load_any", "find_checkpoint", "is_export",
           "consolidated_state_dict", "checkpoint_config"]
