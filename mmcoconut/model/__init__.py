"""MMCoconut model: building (build.py), vision tower, projector, multi-pass latent forward, generation."""
from .build import build_image_processor, build_model, build_tokenizer
from .generate import generate, generate_reference
from .latent import MMCoconut, MMCoconutOutput
from .projector import build_projector
from .vision import num_image_tokens

__all__ = ["build_tokenizer", "build_model", "build_image_processor", "num_image_tokens", "MMCoconut",
           "MMCoconutOutput", "build_projector", "generate", "generate_reference"]
