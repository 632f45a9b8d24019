"""MMCoconutConfig: the Hugging Face config of an MMCoconut model (causal LM + vision tower + projector + latents).

Shipped inside every export (imports only transformers): `AutoConfig.from_pretrained(export, trust_remote_code=True)`.
"""
from __future__ import annotations

from transformers import AutoConfig, CLIPVisionConfig, GPT2Config, PretrainedConfig

from .families import UnsupportedBackbone, lm_family, vision_config as vision_tower_config
from .vision import num_image_tokens

SPECIAL_ID_NAMES = ("image", "start", "latent", "end", "pad", "eos")
OPTIONAL_ID_NAMES = ("bos",)  # absent in exports of GPT-2 models and of older mmcoconut versions

try:  # transformers >= 5.20 declares sub-configs as specs (an AutoConfig spec needs its default model_type)
    from transformers.configuration_utils import SubConfigSpec
except ImportError:
    SubConfigSpec = None


def _sub_config(value, default_cls, where: str):
    """A sub-config from a config, a dict (its model_type picks the class; none: `default_cls`, as in exports
    written before other backbones were supported) or None (the default)."""
    if value is None:
        return default_cls()
    if isinstance(value, dict):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        value = dict(value)
        mt = value.pop("model_type", None) or default_cls.model_type
        if mt not in CONFIG_MAPPING:
            raise UnsupportedBackbone(f"MMCoconutConfig.{where}: unknown model_type {mt!r}")
        return CONFIG_MAPPING[mt](**value)
    return value


class MMCoconutConfig(PretrainedConfig):
    """Everything needed to rebuild the model without its training config.

    text_config / vision_config: the language model's config (GPT-2, Llama, Qwen2 or Mistral; vocabulary already
    resized for the special tokens) and the vision tower's (CLIP or SigLIP vision). projector, image_tokens
    ("pooled" | "patches"), vision_layer, freeze_vision: as in the run config's `model` section, and latent_scale
    (how a fed-back hidden state is scaled). special_ids: token ids of <image>, <|start-latent|>, <|latent|>,
    <|end-latent|>, pad, eos (and bos for tokenizers that begin every sequence with it).
    c_thought, max_latent_stage, pad_latent_to_max, coconut, no_cot: the curriculum the model was trained with
    (the default number of latents at inference is max_latent_stage * c_thought). choices_in_question: whether its
    training questions listed their choices (" The choices are 0: ..."); None: not recorded (older exports), read
    as true. answer_max_new_tokens,
    dummy_latent: inference defaults. run_config: the resolved training config (paths made portable),
    eval_results: the four-view table when known, mmcoconut_version: the code version that exported it.
    """

    model_type = "mmcoconut"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}  # transformers < 5.20 spelling
    if SubConfigSpec is not None:
        sub_configs_defaults = {"text_config": SubConfigSpec(AutoConfig, model_type="gpt2"),
                                "vision_config": SubConfigSpec(AutoConfig, model_type="clip_vision_model")}

    def __init__(self, text_config=None, vision_config=None, projector="mlp2x_gelu", image_tokens="pooled",
                 vision_layer=-2, freeze_vision=True, special_ids=None, c_thought=1, max_latent_stage=0,
                 pad_latent_to_max=False, coconut=True, no_cot=False, answer_max_new_tokens=64,
                 dummy_latent="zeros", run_config=None, eval_results=None, mmcoconut_version=None,
                 latent_scale="none", choices_in_question=None, **kwargs):
        self.text_config = _sub_config(text_config, GPT2Config, "text_config")
        self.vision_config = _sub_config(vision_config, CLIPVisionConfig, "vision_config")
        lm_family(self.text_config, "MMCoconutConfig.text_config")
        vision_tower_config(self.vision_config, "MMCoconutConfig.vision_config")
        self.projector = projector
        self.image_tokens = image_tokens
        self.vision_layer = vision_layer
        self.freeze_vision = freeze_vision
        self.special_ids = dict(special_ids) if special_ids else None
        self.c_thought = c_thought
        self.max_latent_stage = max_latent_stage
        self.pad_latent_to_max = pad_latent_to_max
        self.coconut = coconut
        self.no_cot = no_cot
        self.answer_max_new_tokens = answer_max_new_tokens
        self.dummy_latent = dummy_latent
        self.latent_scale = latent_scale
        self.choices_in_question = choices_in_question
        self.run_config = run_config
        self.eval_results = eval_results
        self.mmcoconut_version = mmcoconut_version
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", True))
        super().__init__(**kwargs)
        if self.special_ids is not None and set(self.special_ids) - set(OPTIONAL_ID_NAMES) != set(SPECIAL_ID_NAMES):
            raise ValueError(f"MMCoconutConfig.special_ids must have the keys {SPECIAL_ID_NAMES} (and optionally "
                             f"{OPTIONAL_ID_NAMES}), got {sorted(self.special_ids)}")

    @property
    def num_image_tokens(self) -> int:
        """<image> placeholders per image: 1 (pooled) or one per patch (patches, CLS dropped)."""
        return num_image_tokens(self.vision_config, self.image_tokens)

    @property
    def default_n_latents(self) -> int:
        """Latents in a coconut/dummy prompt unless asked otherwise: max_latent_stage * c_thought (the last stage)."""
        return max(0, int(self.max_latent_stage)) * int(self.c_thought)

    @property
    def cot_markers(self) -> bool:
        """Whether a cot prompt ends with START END (a model trained with coconut: true, like its stage 0)."""
        return bool(self.coconut and not self.no_cot)


__all__ = ["MMCoconutConfig"]
