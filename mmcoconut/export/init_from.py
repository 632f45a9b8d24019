"""`model.init_from` (the seed's `load_model_path`): start training from existing weights instead of the base models.

Accepted: an mmcoconut export, a DeepSpeed checkpoint (run dir, root or tag dir; any ZeRO stage), or a torch
state-dict file (`torch.save(model.state_dict())`) of an MMCoconut (keys `lm.*`, `vision.*`, `projector.*`, optionally
prefixed `module.` or `model.`) or of a language model alone (GPT-2's keys `transformer.*` / `lm_head.*`, Llama /
Qwen2 / Mistral's `model.*` / `lm_head.*`, or upstream Coconut's `base_causallm.*`), which then initialises only the
language model. Shapes must match the model built from
the run config (same base models, special tokens included); anything else is one error naming the file and keys.
Not applied when the run resumes from its own checkpoint (that checkpoint has the weights).
"""
from __future__ import annotations

from pathlib import Path

import torch

TIED = {"lm.lm_head.weight"}
MMCOCONUT_PREFIXES = ("lm.", "vision.", "projector.")


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """fp32 CPU tensors keyed like MMCoconut.state_dict() (or like a GPT-2's, for an LM-only file)."""
    from .ds_checkpoint import consolidated_state_dict, find_checkpoint
    from .hf_export import is_export

    p = Path(path)
    if is_export(p):
        from safetensors.torch import load_file

        files = sorted(p.glob("model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"model.init_from {p}: export without model*.safetensors")
        sd = {}
        for f in files:
            sd.update(load_file(str(f)))
    elif p.is_dir():
        root, tag = find_checkpoint(p)
        sd = consolidated_state_dict(root, tag)
    elif p.is_file():
        obj = torch.load(p, map_location="cpu", weights_only=True)
        sd = obj.get("state_dict", obj.get("module", obj)) if isinstance(obj, dict) else None
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise ValueError(f"model.init_from {p}: not a state dict of tensors")
    else:
        raise FileNotFoundError(f"model.init_from {p}: no such file or directory")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "base_causallm."):  # DeepSpeed / DDP wrapper, upstream Coconut's wrapper
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v.float() if torch.is_floating_point(v) else v
    if any(k.startswith(tuple("model." + p for p in MMCOCONUT_PREFIXES)) for k in out):  # the HF export's wrapper
        out = {k[len("model."):] if k.startswith("model.") else k: v for k, v in out.items()}
    if out and not any(k.startswith(MMCOCONUT_PREFIXES) for k in out):  # a language model alone
        out = {f"lm.{k}": v for k, v in out.items()}
    return out


def load_init_weights(model, path, rank: int = 0) -> dict:
    """Load `path` into a built MMCoconut (in place; ZeRO-3 partitioned parameters are gathered). Returns
    {"loaded": n tensors, "kept": [prefixes left at their built weights]}; raises ValueError on any mismatch."""
    import contextlib

    sd = read_state_dict(path)
    own = model.state_dict()
    shapes = {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in model.named_parameters()}
    shapes.update({k: tuple(v.shape) for k, v in own.items() if k not in shapes})
    unexpected = sorted(k for k in sd if k not in shapes)
    wrong = sorted(f"{k} {tuple(sd[k].shape)} vs {shapes[k]}" for k in sd if k in shapes
                   and tuple(sd[k].shape) != shapes[k])
    if unexpected or wrong:
        raise ValueError(f"model.init_from {path}: does not fit the model built from the run config: "
                         + (f"unknown keys {unexpected[:5]}" if unexpected else "")
                         + (f"; shape mismatch {wrong[:3]}" if wrong else ""))
    missing = sorted(k for k in shapes if k not in sd and k not in TIED)
    kept = sorted({k.split(".")[0] for k in missing})
    lm_only = all(k.startswith("lm.") for k in sd)
    if missing and not lm_only and kept != ["vision"]:
        raise ValueError(f"model.init_from {path}: missing weights {missing[:5]} (a partial file must hold the "
                         "language model only, or everything but a frozen vision tower)")
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    ctx = contextlib.nullcontext()
    if params:
        import deepspeed
        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with ctx, torch.no_grad():
        model.load_state_dict(sd, strict=False)
    if rank == 0:
        print(f"init: {len(sd)} tensors from {path}" + (f" (kept the built {', '.join(kept)})" if kept else ""),
              flush=True)
    return {"loaded": len(sd), "kept": kept}


__all__ = ["load_init_weights", "read_state_dict"]
