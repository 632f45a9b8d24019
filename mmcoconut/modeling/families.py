"""What differs between the supported backbone families, in one place (the rest of the model is family-agnostic).

Language models: Hugging Face decoder-only causal LMs with a KV cache, loaded through the Auto classes; the family
is the config's `model_type`, never the checkpoint id.

    concern                  gpt2                           llama (Llama 3.x, SmolLM2) / qwen2 (Qwen2.5) / mistral
    base model, embeddings   lm.transformer, .wte           lm.model, .embed_tokens      -> lm.base_model,
                                                                                             lm.get_input_embeddings()
    output head              lm_head, tied to wte           lm_head, tied or not          -> lm.get_output_embeddings()
    K/V heads (GQA)          n_head                         num_key_value_heads           -> kv_geometry()
    head dim                 n_embd / n_head                head_dim or hidden / heads    -> kv_geometry()
    positions                learned (wpe)                  rotary; both from position_ids (passed on every call)
    longest sequence         n_positions                    max_position_embeddings       -> max_positions()
    sliding window           none                           mistral: sliding_window; qwen2: use_sliding_window
                                                                                          -> check_window()
    norm / projections       LayerNorm / Conv1D             RMSNorm / nn.Linear           -> weight_grad_modules()
    pad token                its own <|pad|> (added)        Llama has none: tokens.add_special_tokens adds one

Vision towers: CLIP or SigLIP vision models (a full CLIP/SigLIP checkpoint stands for its vision half). CLIP's
hidden states start with a CLS token, SigLIP's do not (patches = all tokens; pooled = SigLIP's attention-pool head).
Imports only torch/transformers (shipped inside exports).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

from torch import nn

LM_FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
VISION_FAMILIES = {"clip": "clip_vision_model", "clip_vision_model": "clip_vision_model",
                   "siglip": "siglip_vision_model", "siglip_vision_model": "siglip_vision_model"}


class UnsupportedBackbone(ValueError):
    """A language model or vision tower outside the supported families (raised from the config alone)."""


class KVGeometry(NamedTuple):
    n_layer: int
    n_kv_heads: int
    head_dim: int


# ------------------------------------------------------------------------------------ language models
def lm_family(config, where: str = "model.lm_id") -> str:
    """The family of an LM config (its model_type), or UnsupportedBackbone naming it and the supported ones."""
    mt = getattr(config, "model_type", None)
    supported = f"supported: {', '.join(LM_FAMILIES)} (decoder-only causal LMs with a KV cache)"
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedBackbone(f"{where}: model_type {mt!r} is an encoder-decoder model; {supported}")
    if mt not in LM_FAMILIES:
        raise UnsupportedBackbone(f"{where}: language-model family {mt!r} is not supported; {supported}")
    return mt


def kv_geometry(config) -> KVGeometry:
    """Layers, K/V heads (fewer than query heads under grouped-query attention) and head dim of the LM config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KVGeometry(config.num_hidden_layers, kv_heads, head_dim)


def max_positions(config) -> Optional[int]:
    """Longest position the LM was built for (GPT-2: n_positions; others: max_position_embeddings)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def sliding_window(config) -> Optional[tuple[str, int]]:
    """(config key, window) when the LM attends within a sliding window (Mistral; Qwen2 with use_sliding_window),
    else None."""
    if getattr(config, "model_type", None) not in ("mistral", "qwen2"):
        return None
    window = getattr(config, "sliding_window", None)
    if config.model_type == "qwen2":
        if not getattr(config, "use_sliding_window", False) or not window:
            return None
        return "use_sliding_window/sliding_window", window
    return ("sliding_window", window) if window else None


def check_window(config, length: int, what: str = "a sequence") -> None:
    """mmcoconut attends over the whole sequence; with a sliding-window LM refuse what could exceed the window
    (it would compute something else than the LM does) with one line naming the key."""
    sw = sliding_window(config)
    if sw is not None and length > sw[1]:
        raise ValueError(f"{what} of {length} columns exceeds the language model's sliding window ({sw[0]}="
                         f"{sw[1]}): mmcoconut computes full attention only; keep model.max_length (+ generated "
                         f"tokens) <= {sw[1]} or use a checkpoint without a sliding window")


def weight_grad_modules(lm: nn.Module) -> list[nn.Module]:
    """The projections whose weight gradients the latent forward defers (wgrad.py): GPT-2's Conv1D and nn.Linear
    layers inside the base model (the decoder layers; not lm_head, which runs once per micro-batch)."""
    from transformers.pytorch_utils import Conv1D
    return [m for m in lm.base_model.modules() if isinstance(m, (Conv1D, nn.Linear))]


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks (what gradient checkpointing checkpoints, one call per pass)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in lm.base_model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointing(layers: list[nn.Module], on: bool) -> None:
    """Gradient checkpointing of these decoder layers (HF's GradientCheckpointingLayer switch) with
    torch.utils.checkpoint, non-reentrant: the latent forward's gradients reach the K/V history, which a layer reads
    without taking it as an input (a reentrant checkpoint would drop them); the cache view a pass's layers read is
    bound to their call, so the recompute reads what the first run read."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for layer in layers:
        layer.gradient_checkpointing = on
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


def refuse_reentrant(layers: list[nn.Module]) -> None:
    """HF's gradient_checkpointing_enable() defaults to reentrant checkpoints: refuse them (ValueError)."""
    for layer in layers:
        fn = getattr(layer, "_gradient_checkpointing_func", None)
        if layer.gradient_checkpointing and getattr(fn, "keywords", {}).get("use_reentrant", True):
            raise ValueError("MMCoconut: reentrant gradient checkpointing loses the gradients of the latent forward's "
                             "K/V history; use model.set_gradient_checkpointing(True) (train.gradient_checkpointing)")


# ------------------------------------------------------------------------------------ vision towers
def vision_config(config, where: str = "model.vision_id"):
    """The vision-tower config of a CLIP/SigLIP (vision) config, or UnsupportedBackbone naming it."""
    mt = getattr(config, "model_type", None)
    if mt not in VISION_FAMILIES:
        raise UnsupportedBackbone(f"{where}: model_type {mt!r} is not a supported vision tower; supported: CLIP "
                                  "and SigLIP (vision) models (clip, clip_vision_model, siglip, siglip_vision_model)")
    return config.vision_config if mt in ("clip", "siglip") else config


def vision_model_class(config):
    """CLIPVisionModel or SiglipVisionModel for a (vision) config."""
    import transformers
    name = VISION_FAMILIES[vision_config(config).model_type]
    return transformers.CLIPVisionModel if name == "clip_vision_model" else transformers.SiglipVisionModel


def has_cls_token(vision_cfg) -> bool:
    """CLIP prepends a CLS token to the patch tokens; SigLIP does not."""
    return vision_cfg.model_type == "clip_vision_model"
