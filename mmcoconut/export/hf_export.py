"""Hugging Face exports: an MMCoconut (from a DeepSpeed checkpoint of any ZeRO stage, or a live engine) written as
one self-contained `save_pretrained` directory, and loading it back.

Export layout (MMCoconutForConditionalGeneration.save_pretrained, see mmcoconut/modeling/):
  config.json                 MMCoconutConfig: LM + vision-tower configs, projector, special ids, image-token mode,
                              curriculum, the resolved run config (paths made portable), auto_map
  model.safetensors           every weight (language model, vision tower, projector), fp32
  tokenizer.json, tokenizer_config.json, preprocessor_config.json, processor_config.json
  *.py                        the model code (loads with trust_remote_code=True where mmcoconut is not installed)
  README.md                   model card
`load_export(dir)` returns (MMCoconut, tokenizer, image_processor, cfg) as before; `load_hf(path)` returns the
Hugging Face model (export dir or DeepSpeed checkpoint). Nothing in an export refers to the machine it came from.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional


from .. import kernels  # noqa: F401  (importing it plugs the fused injection op into the loaded model)
from .ds_checkpoint import checkpoint_config, consolidated_state_dict, find_checkpoint, load_checkpoint

TIED = ("lm.lm_head.weight",)  # tied to the LM's input embedding table (when its config ties them)


# ------------------------------------------------------------------------------------------ building
def portable(value, key: str = ""):
    """A run-config value with machine-specific paths removed: absolute paths -> '.../<last two parts>';
    local model dirs (model.*_id) -> 'local:<path>' so they are never mistaken for Hub ids."""
    if isinstance(value, dict):
        return {k: portable(v, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, key) for v in value]
    if not isinstance(value, str) or not value:
        return value
    out = value
    if os.path.isabs(value):
        out = ".../" + "/".join(Path(value).parts[-2:])
    if key.startswith("model.") and key.endswith("_id") and Path(value).exists():
        out = "local:" + out
    return out


def hf_config(model, cfg, eval_results: Optional[dict] = None):
    """MMCoconutConfig describing a built MMCoconut trained with run config `cfg`."""
    import mmcoconut
    from mmcoconut.modeling import MMCoconutConfig

    text, vision = model.lm.config.to_dict(), model.vision.config.to_dict()
    text["dtype"] = vision["dtype"] = "float32"  # exports hold fp32 weights whatever the training precision
    for sub in (text, vision):
        sub.pop("_name_or_path", None)  # where the base model was loaded from: a path of this machine
    c = cfg.curriculum
    return MMCoconutConfig(
        text_config=text, vision_config=vision, projector=cfg.model.projector, image_tokens=model.image_tokens,
        vision_layer=model.vision_layer, freeze_vision=model.freeze_vision, special_ids=_special_ids(model.ids),
        c_thought=c.c_thought, max_latent_stage=c.max_latent_stage, pad_latent_to_max=c.pad_latent_to_max,
        coconut=c.coconut, no_cot=c.no_cot, answer_max_new_tokens=cfg.eval.max_new_tokens,
        dummy_latent=cfg.eval.dummy_latent, latent_scale=model.latent_scale, run_config=portable(cfg.to_dict()),
        choices_in_question=cfg.data.choices_in_question,
        eval_results=eval_results,
        mmcoconut_version=mmcoconut.__version__)


def _special_ids(ids) -> dict:
    """SpecialIds as the config stores them (an unset optional id, e.g. bos for GPT-2, is left out)."""
    return {k: v for k, v in dataclasses.asdict(ids).items() if v is not None}


def to_hf(model, tokenizer, image_processor, cfg, eval_results: Optional[dict] = None):
    """The Hugging Face model (and processor) around a built MMCoconut; shares its weights."""
    from mmcoconut.modeling import MMCoconutForConditionalGeneration, MMCoconutProcessor

    config = hf_config(model, cfg, eval_results)
    proc = MMCoconutProcessor.from_config(config, image_processor, tokenizer)
    return MMCoconutForConditionalGeneration.from_mmcoconut(model, config, proc)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out` (an older `out` is removed only after the new one is in place)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def save_hf(hf, out_dir) -> Path:
    """hf.save_pretrained into `out_dir` atomically: written to a sibling temp dir, then renamed."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    _replace_dir(tmp, out)
    return out


def save_export(model, tokenizer, cfg, out_dir, image_processor=None, eval_results: Optional[dict] = None) -> Path:
    """Write the export described in the module docstring; returns the output dir."""
    if image_processor is None:
        from ..factory import build_image_processor
        image_processor = build_image_processor(cfg.model)
    return save_hf(to_hf(model, tokenizer, image_processor, cfg, eval_results), out_dir)


# ------------------------------------------------------------------------------------------- loading
def is_export(path) -> bool:
    """A directory written by save_export (config.json of model_type "mmcoconut")."""
    f = Path(path) / "config.json"
    try:
        return f.is_file() and json.loads(f.read_text()).get("model_type") == "mmcoconut"
    except ValueError:
        return False


def _check_export(d: Path) -> None:
    if is_export(d):
        return
    if (d / "mmcoconut.json").is_file() and (d / "lm").is_dir():
        raise FileNotFoundError(f"{d}: an export in the old layout (lm/, projector.safetensors); export the "
                                "checkpoint again with mmcoconut-export CKPT OUT")
    raise FileNotFoundError(f"{d}: not an mmcoconut export (no config.json with model_type 'mmcoconut'); make one "
                            "with mmcoconut-export CKPT OUT ")


def _run_config(hf_cfg, export_dir: Path):
    """The training config stored in the export, with the model section pointing into the export."""
    from ..config import ConfigError, Config, load_config

    try:
        cfg = load_config(data=hf_cfg.run_config or {})
    except ConfigError as e:  # written by another mmcoconut version: keep what the model needs
        print(f"note: {export_dir}: stored run config not loadable here ({e}); using the model's own settings")
        cfg = Config()
    m, c = cfg.model, cfg.curriculum
    m.lm_id = m.vision_id = m.tokenizer_id = str(export_dir)
    m.image_tokens, m.vision_layer, m.freeze_vision = hf_cfg.image_tokens, hf_cfg.vision_layer, hf_cfg.freeze_vision
    m.projector = hf_cfg.projector
    m.latent_scale = getattr(hf_cfg, "latent_scale", "none")
    c.c_thought, c.max_latent_stage = hf_cfg.c_thought, hf_cfg.max_latent_stage
    c.pad_latent_to_max, c.coconut, c.no_cot = hf_cfg.pad_latent_to_max, hf_cfg.coconut, hf_cfg.no_cot
    cfg.data.choices_in_question = getattr(hf_cfg, "choices_in_question", None)  # None (older exports): as stored
    return cfg


def load_hf(path, tag: Optional[str] = None, overrides: Optional[list[str]] = None, device="cpu"):
    """MMCoconutForConditionalGeneration (with its processor) from an export dir or a DeepSpeed checkpoint."""
    from mmcoconut.modeling import MMCoconutForConditionalGeneration

    if is_export(path):
        hf = MMCoconutForConditionalGeneration.from_pretrained(str(path))
        hf.get_processor()
    else:
        model, tok, improc, cfg, _ = load_checkpoint(path, tag=tag, overrides=overrides)
        hf = to_hf(model, tok, improc, cfg)
    return hf.to(device).eval()


def load_export(export_dir, device="cpu"):
    """(model, tokenizer, image_processor, cfg) from an export dir; the model (an MMCoconut) is in eval mode."""
    d = Path(export_dir)
    _check_export(d)
    hf = load_hf(d, device=device)
    proc = hf.get_processor()
    return hf.model, proc.tokenizer, proc.image_processor, _run_config(hf.config, d)


def load_any(path, tag: Optional[str] = None, overrides: Optional[list[str]] = None, device="cpu"):
    """An export dir or a DeepSpeed checkpoint -> (model, tokenizer, image_processor, cfg, info)."""
    if is_export(path):
        model, tok, ip, cfg = load_export(path, device=device)
        if overrides:
            from ..config import load_config
            cfg = load_config(data=cfg.to_dict(), overrides=overrides)
        return model, tok, ip, cfg, {"export": str(path), "checkpoint": str(path)}
    return load_checkpoint(path, tag=tag, overrides=overrides, device=device)


# --------------------------------------------------------------------------- live engine (end of training)
def export_engine(engine, cfg, state, tokenizer, image_processor, out_dir=None) -> Optional[Path]:
    """checkpoint.export_final: write `<run dir>/export` from the live engine (mmcoconut.train.engines: DeepSpeed
    or FSDP2) once training finished all epochs. Every rank must call it (the weights are gathered collectively);
    rank 0 writes."""
    if not (state.epoch_done and state.epoch + 1 >= cfg.train.num_epochs):
        if engine.rank == 0:
            print("export: skipped (checkpoint.export_final): training stopped before its last epoch", flush=True)
        return None
    sd = engine.full_state_dict()  # fp32, on rank 0
    if engine.rank != 0:
        return None
    from mmcoconut.modeling import MMCoconutForConditionalGeneration

    config = hf_config(engine.module, cfg)
    with engine.building_whole():  # (a ZeRO-3 engine would have transformers build it partitioned)
        hf = MMCoconutForConditionalGeneration(config)  # fresh CPU copy in fp32, then the trained weights
    missing, unexpected = hf.model.load_state_dict(sd, strict=False)
    if [k for k in missing if k not in TIED] or unexpected:
        raise RuntimeError(f"export: engine weights do not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    from mmcoconut.modeling import MMCoconutProcessor
    hf.processor = MMCoconutProcessor.from_config(config, image_processor, tokenizer)
    out = save_hf(hf, out_dir or Path(cfg.run_dir) / "export")
    n = sum(p.numel() for p in hf.parameters())
    print(f"export: {out} ({n / 1e6:.2f}M parameters, step {state.step}); load it with "
          f"AutoModel.from_pretrained('{out}', trust_remote_code=True)", flush=True)
    return out


# ------------------------------------------------------------------------------------ evaluation results
def find_eval_results(checkpoint: str, run_dir: Optional[str] = None) -> Optional[dict]:
    """The eval_results.json (mmcoconut.eval) written for exactly this checkpoint tag dir, if any."""
    from mmcoconut.modeling.card import read_eval_results

    target = Path(checkpoint).resolve()
    roots = {target.parent} | ({Path(run_dir)} if run_dir else set())
    for root in roots:
        for f in sorted(root.glob("eval*/eval_results.json"), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                got = json.loads(f.read_text()).get("checkpoint")
            except ValueError:
                continue
            if got and Path(got).resolve() == target:
                return read_eval_results(f)
    return None


__all__ = ["save_export", "save_hf", "to_hf", "hf_config", "load_export", "load_hf", "load_any", "is_export",
           "export_engine", "find_eval_results", "portable", "load_checkpoint",
           "find_checkpoint", "checkpoint_config", "consolidated_state_dict"]
