"""Hugging Face-native MMCoconut: config, model, processor, shipped code and model card (see docs/CONTRACT.md).

Importing this package registers the "mmcoconut" model type with the Auto classes, so with mmcoconut installed
`AutoModel.from_pretrained(export)` works without trust_remote_code (the export's own code is used otherwise).
"""
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_mmcoconut import MMCoconutConfig
from .modeling_mmcoconut import MMCoconutForConditionalGeneration
from .processing_mmcoconut import MMCoconutProcessor

AutoConfig.register("mmcoconut", MMCoconutConfig, exist_ok=True)
AutoModel.register(MMCoconutConfig, MMCoconutForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(MMCoconutConfig, MMCoconutForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MMCoconutConfig, MMCoconutProcessor, exist_ok=True)

__all__ = ["MMCoconutConfig", "MMCoconutForConditionalGeneration", "MMCoconutProcessor"]
