"""Build the tokenizer, the image processor and MMCoconut (GPT-2 + CLIP vision + projector) from the run config's
`model` section (hub ids or local dirs); training, evaluation and checkpoint export build through here."""
from __future__ import annotations

import contextlib

import torch

from . import kernels  # noqa: F401  (importing it plugs the fused injection op into the model)
from .modeling.latent import MMCoconut
from .modeling.projector import build_projector
from .modeling.tokens import SpecialIds, add_special_tokens
from .modeling.vision import build_vision, num_image_tokens


def build_tokenizer(mcfg):
    """AutoTokenizer of tokenizer_id (default lm_id) with mmcoconut's special tokens (and a pad token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mcfg.tokenizer_id or mcfg.lm_id)
    add_special_tokens(tok)
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


def _init_new_rows(lm, tokenizer, old_rows: int, init_token: str, edit_params=None) -> None:
    """Rows >= old_rows start from `init_token`'s embedding (Coconut: "<<"), else the mean of the old rows.
    With tied lm_head this also sets the output rows. `edit_params([w])`: a context in which a sharded weight is
    whole and writable (the engine's; e.g. gathered and modified on rank 0)."""
    w = lm.get_input_embeddings().weight
    ctx = edit_params([w]) if edit_params is not None else contextlib.nullcontext()
    ids = tokenizer.encode(init_token, add_special_tokens=False) if init_token else []
    with ctx, torch.no_grad():
        if len(ids) == 1 and ids[0] < old_rows:
            src = w[ids[0]].clone()
        else:
            src = w[:old_rows].mean(0)
        w[old_rows:] = src


def build_model(mcfg, tokenizer, edit_params=None, deferred_wgrad: bool = True) -> MMCoconut:
    """GPT2LMHeadModel(lm_id) resized to len(tokenizer) + CLIPVisionModel(vision_id) + projector.
    edit_params: see _init_new_rows (an engine that shards weights while they load passes it)."""
    from transformers import GPT2LMHeadModel

    ids = SpecialIds.from_tokenizer(tokenizer)
    lm = GPT2LMHeadModel.from_pretrained(mcfg.lm_id, dtype=torch.float32)
    old_rows = lm.get_input_embeddings().num_embeddings  # not the weight's shape: a sharded weight's is [0]
    if len(tokenizer) > old_rows:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _init_new_rows(lm, tokenizer, old_rows, mcfg.new_token_init, edit_params)
    lm.config.pad_token_id = ids.pad
    vision = build_vision(mcfg)
    n_img = num_image_tokens(vision.config, mcfg.image_tokens)
    projector = build_projector(mcfg.projector, vision.config.hidden_size, lm.config.n_embd)
    return MMCoconut(lm, vision, projector, ids, n_img, image_tokens=mcfg.image_tokens,
                     vision_layer=mcfg.vision_layer, freeze_vision=mcfg.freeze_vision, latent_scale=mcfg.latent_scale,
                     deferred_wgrad=deferred_wgrad)
