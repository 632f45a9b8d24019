"""CLIP vision tower: loading and image-token features (pooled CLS token or LLaVA-style patch tokens)."""
from __future__ import annotations

import torch

IMAGE_TOKEN_MODES = ("pooled", "patches")


def num_image_tokens(vision_config, mode: str) -> int:
    """<image> placeholders per image: 1 (pooled) or (image_size // patch_size) ** 2 (patches, CLS dropped)."""
    if mode == "pooled":
        return 1
    if mode == "patches":
        return (vision_config.image_size // vision_config.patch_size) ** 2
    raise ValueError(f"unknown image_tokens mode {mode!r}; choose from {IMAGE_TOKEN_MODES}")


def build_vision(mcfg):
    """CLIPVisionModel from `mcfg.vision_id`; frozen (requires_grad False, eval mode) unless freeze_vision is off."""
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(mcfg.vision_id, dtype=torch.float32)
    if mcfg.freeze_vision:
        vision.requires_grad_(False)
        vision.eval()
    return vision


def encode_images(vision, pixel_values: torch.Tensor, mode: str, layer: int) -> torch.Tensor:
    """pixel_values [B,3,H,W] -> vision features [B, n_img, Dv] (in the vision tower's dtype).

    pooled: `pooler_output` (post-layernorm CLS), one token. patches: hidden_states[layer] without CLS.
    """
    pixel_values = pixel_values.to(next(vision.parameters()).dtype)
    if mode == "pooled":
        return vision(pixel_values=pixel_values).pooler_output.unsqueeze(1)
    if mode == "patches":
        out = vision(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[layer][:, 1:]
    raise ValueError(f"unknown image_tokens mode {mode!r}; choose from {IMAGE_TOKEN_MODES}")
