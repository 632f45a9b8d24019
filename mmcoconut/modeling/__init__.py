"""The model as an export ships it: MMCoconut (multi-pass latent forward, generation) and its Hugging Face config,
model and processor. Every module here imports only torch, transformers and its siblings (shipped.py).

Importing this package registers the "mmcoconut" model type with the Auto classes, so with mmcoconut installed
`AutoModel.from_pretrained(export)` works without trust_remote_code (the export's own code is used otherwise).
"""
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_mmcoconut import MMCoconutConfig
from .generate import generate, generate_reference
from .latent import MMCoconut, MMCoconutOutput
from .modeling_mmcoconut import MMCoconutForConditionalGeneration
from .pass_plan import LatentPlan, plan_batch
from .processing_mmcoconut import MMCoconutProcessor
from .tokens import SpecialIds, add_special_tokens

AutoConfig.register("mmcoconut", MMCoconutConfig, exist_ok=True)
AutoModel.register(MMCoconutConfig, MMCoconutForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(MMCoconutConfig, MMCoconutForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MMCoconutConfig, MMCoconutProcessor, exist_ok=True)

__all__ = ["MMCoconut", "MMCoconutOutput", "generate", "generate_reference", "LatentPlan", "plan_batch",
           "SpecialIds", "add_special_tokens", "MMCoconutConfig", "MMCoconutForConditionalGeneration",
           "MMCoconutProcessor"]
