"""Vision tower (CLIP or SigLIP, families.py): loading and image-token features (pooled token or LLaVA-style patch
tokens)."""
from __future__ import annotations

import torch

from .families import has_cls_token, vision_model_class

IMAGE_TOKEN_MODES = ("pooled", "patches")


def num_image_tokens(vision_config, mode: str) -> int:
    """<image> placeholders per image: 1 (pooled) or (image_size // patch_size) ** 2 (patches; CLIP's CLS dropped)."""
    if mode == "pooled":
        return 1
    if mode == "patches":
        return (vision_config.image_size // vision_config.patch_size) ** 2
    raise ValueError(f"unknown image_tokens mode {mode!r}; choose from {IMAGE_TOKEN_MODES}")


def build_vision(mcfg, config=None):
    """The vision model of `mcfg.vision_id` (CLIPVisionModel / SiglipVisionModel, from its config: `config` when the
    caller has read it already); frozen (requires_grad False, eval mode) unless freeze_vision is off."""
    if config is None:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(mcfg.vision_id)
    vision = vision_model_class(config).from_pretrained(mcfg.vision_id, dtype=torch.float32)
    if mcfg.freeze_vision:
        vision.requires_grad_(False)
        vision.eval()
    return vision


def encode_images(vision, pixel_values: torch.Tensor, mode: str, layer: int) -> torch.Tensor:
    """pixel_values [B,3,H,W] -> vision features [B, n_img, Dv] (in the vision tower's dtype).

    pooled: `pooler_output` (CLIP: the post-layernorm CLS token; SigLIP: its attention-pool head), one token.
    patches: hidden_states[layer] without CLIP's CLS token (SigLIP has none: all tokens).
    """
    pixel_values = pixel_values.to(next(vision.parameters()).dtype)
    if mode == "pooled":
        pooled = vision(pixel_values=pixel_values).pooler_output
        if pooled is None:
            raise ValueError("model.image_tokens=pooled: this vision tower has no pooling head "
                             "(vision_use_head=false); use model.image_tokens=patches")
        return pooled.unsqueeze(1)
    if mode == "patches":
        out = vision(pixel_values=pixel_values, output_hidden_states=True)
        feats = out.hidden_states[layer]
        return feats[:, 1:] if has_cls_token(vision.config) else feats
    raise ValueError(f"unknown image_tokens mode {mode!r}; choose from {IMAGE_TOKEN_MODES}")
