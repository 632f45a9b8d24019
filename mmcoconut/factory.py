"""Build the tokenizer, the image processor and MMCoconut (causal LM + vision tower + projector) from the run config's
`model` section (hub ids or local dirs); training, evaluation and checkpoint export build through here.

The backbones' families are checked from their configs alone (AutoConfig; modeling/families.py) before anything
else is loaded: an unsupported LM or vision tower is one ConfigError naming the key, the family and the supported
ones."""
from __future__ import annotations

import contextlib

import torch

from . import kernels  # noqa: F401  (importing it plugs the fused injection op into the model)
from .config import ConfigError
from .modeling import families
from .modeling.latent import MMCoconut
from .modeling.projector import build_projector
from .modeling.tokens import SpecialIds, add_special_tokens
from .modeling.vision import build_vision, num_image_tokens


def backbone_configs(mcfg):
    """(LM config, vision config) of model.lm_id / model.vision_id, read with AutoConfig (no weights) and checked:
    ConfigError (one line) for an unsupported family, or an LM whose sliding window is shorter than
    model.max_length."""
    from transformers import AutoConfig

    cfgs = []
    for key, check in (("lm_id", families.lm_family), ("vision_id", families.vision_config)):
        ref = getattr(mcfg, key)
        try:
            cfgs.append(AutoConfig.from_pretrained(ref))
        except (OSError, ValueError) as e:  # no such dir / hub id, or a model type transformers does not know
            raise ConfigError(f"model.{key}={ref}: {str(e).strip().splitlines()[0]}") from None
        try:
            check(cfgs[-1], f"model.{key}={ref}")
        except families.UnsupportedBackbone as e:
            raise ConfigError(str(e)) from None
    try:
        families.check_window(cfgs[0], mcfg.max_length, f"model.max_length={mcfg.max_length}: a sequence")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfgs[0], cfgs[1]


def build_tokenizer(mcfg):
    """AutoTokenizer of tokenizer_id (default lm_id) with mmcoconut's special tokens (and a pad token). Its
    `mmcoconut_new_ids`: the ids this call added (their embedding rows get model.new_token_init in build_model)."""
    from transformers import AutoTokenizer

    backbone_configs(mcfg)
    tok = AutoTokenizer.from_pretrained(mcfg.tokenizer_id or mcfg.lm_id)
    before = len(tok)
    add_special_tokens(tok)
    tok.mmcoconut_new_ids = tuple(range(before, len(tok)))
    return tok


def build_image_processor(mcfg):
    """The vision checkpoint's image processor. AutoImageProcessor picks the torchvision backend when installed,
    else the PIL one, without the warning `CLIPImageProcessor` prints when torchvision is missing."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(mcfg.vision_id)


def clip_image_processor_class():
    """CLIPImageProcessor, or its PIL implementation when torchvision is missing (same output, no warning)."""
    import transformers
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available() and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def _init_new_rows(lm, tokenizer, rows: list[int], old_rows: int, init_token: str, edit_params=None) -> None:
    """Embedding rows `rows` (the special tokens new to the checkpoint) start from `init_token`'s row (Coconut: "<<"),
    else the mean of the rows below old_rows; an untied output head gets the same treatment (as upstream Coconut
    does). `edit_params(params)`: a context in which sharded weights are whole and writable (the engine's; e.g.
    gathered and modified on rank 0)."""
    weights = [lm.get_input_embeddings().weight]
    head = lm.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    ctx = edit_params(weights) if edit_params is not None else contextlib.nullcontext()
    ids = tokenizer.encode(init_token, add_special_tokens=False) if init_token else []
    index = torch.tensor(rows, dtype=torch.long)
    with ctx, torch.no_grad():
        for w in weights:
            if len(ids) == 1 and ids[0] < old_rows:
                src = w[ids[0]].clone()
            else:
                src = w[:old_rows].mean(0)
            if rows == list(range(old_rows, w.shape[0])):
                w[old_rows:] = src
            else:
                w[index.to(w.device)] = src


def build_model(mcfg, tokenizer, edit_params=None, deferred_wgrad: bool = True) -> MMCoconut:
    """AutoModelForCausalLM(lm_id) with its embeddings resized to len(tokenizer) + the vision model of vision_id
    (CLIP or SigLIP) + projector; the backbones' families are checked from their configs first.
    edit_params: see _init_new_rows (an engine that shards weights while they load passes it)."""
    from transformers import AutoModelForCausalLM

    _, vision_cfg = backbone_configs(mcfg)
    ids = SpecialIds.from_tokenizer(tokenizer)
    lm = AutoModelForCausalLM.from_pretrained(mcfg.lm_id, dtype=torch.float32)
    old_rows = lm.get_input_embeddings().num_embeddings  # not the weight's shape: a sharded weight's is [0]
    if len(tokenizer) > old_rows:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # new to the checkpoint: rows past its table, and tokens added now that fit in it (Qwen2's spare rows)
    rows = sorted(set(range(old_rows, len(tokenizer))) | set(getattr(tokenizer, "mmcoconut_new_ids", ())))
    if rows:
        _init_new_rows(lm, tokenizer, rows, min(old_rows, rows[0]), mcfg.new_token_init, edit_params)
    lm.config.pad_token_id = ids.pad
    vision = build_vision(mcfg, vision_cfg)
    n_img = num_image_tokens(vision.config, mcfg.image_tokens)
    projector = build_projector(mcfg.projector, vision.config.hidden_size, lm.config.hidden_size)
    return MMCoconut(lm, vision, projector, ids, n_img, image_tokens=mcfg.image_tokens,
                     vision_layer=mcfg.vision_layer, freeze_vision=mcfg.freeze_vision, latent_scale=mcfg.latent_scale,
                     deferred_wgrad=deferred_wgrad)
