"""mmcoconut: Coconut-style multimodal latent reasoning (GPT-2 + CLIP) trained with DeepSpeed."""

__version__ = "0.1.0"
