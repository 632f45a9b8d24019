"""MMCoconutForConditionalGeneration: a Hugging Face PreTrainedModel around mmcoconut's MMCoconut.

Shipped inside every export (shipped.py): `AutoModel.from_pretrained(export, trust_remote_code=True)`.
The wrapped `self.model` is the training model itself (same forward, same KV-cached latent generation), so an export
computes exactly what the checkpoint computed. `save_pretrained` writes one self-contained directory: config.json
(with auto_map), model.safetensors (every weight, the vision tower included), the tokenizer, the image processor,
processor_config.json, the shipped code and a model card (README.md). `push_to_hub` uploads that directory.

    model.answer(images, questions, choices=None, view="coconut", n_latents=None)
        -> per item {text, rationale, answer, choice, choice_index, fallback, view, n_latents, n_tokens}
"""
from __future__ import annotations

import tempfile
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from .families import vision_model_class
from .latent import MMCoconut
from .projector import build_projector
from .tokens import SpecialIds
from .shipped import write_code
from .card import write_model_card
from .configuration_mmcoconut import MMCoconutConfig
from .processing_mmcoconut import MMCoconutProcessor

AUTO_MAP = {
    "AutoConfig": "configuration_mmcoconut.MMCoconutConfig",
    "AutoModel": "modeling_mmcoconut.MMCoconutForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_mmcoconut.MMCoconutForConditionalGeneration",
    "AutoProcessor": "processing_mmcoconut.MMCoconutProcessor",
}
VIEWS = ("coconut", "dummy", "cot", "nocot")


class MMCoconutPreTrainedModel(PreTrainedModel):
    config_class = MMCoconutConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False  # MMCoconut.set_gradient_checkpointing (non-reentrant) instead
    _no_split_modules = ["GPT2Block", "CLIPEncoderLayer"]  # per instance: the backbones' own


class MMCoconutForConditionalGeneration(MMCoconutPreTrainedModel):
    _tied_weights_keys = {"model.lm.lm_head.weight": "model.lm.transformer.wte.weight"}  # per instance: the LM's

    def __init__(self, config: MMCoconutConfig, model: Optional[MMCoconut] = None):
        super().__init__(config)
        wrapped = model is not None
        if not wrapped:
            if config.special_ids is None:
                raise ValueError("MMCoconutConfig.special_ids is not set (build the config from a trained model)")
            lm = AutoModelForCausalLM.from_config(config.text_config)
            vision = vision_model_class(config.vision_config)(config.vision_config)
            if config.freeze_vision:
                vision.requires_grad_(False)
            projector = build_projector(config.projector, config.vision_config.hidden_size,
                                        config.text_config.hidden_size)
            model = MMCoconut(lm, vision, projector, SpecialIds(**config.special_ids), config.num_image_tokens,
                              image_tokens=config.image_tokens, vision_layer=config.vision_layer,
                              freeze_vision=config.freeze_vision,
                              latent_scale=getattr(config, "latent_scale", "none"))
        self.model = model
        tied = getattr(model.lm, "_tied_weights_keys", None)  # e.g. {"lm_head.weight": "model.embed_tokens.weight"}
        if isinstance(tied, dict):
            self._tied_weights_keys = {f"model.lm.{k}": f"model.lm.{v}" for k, v in tied.items()}
        self._no_split_modules = [*(model.lm._no_split_modules or []), *(model.vision._no_split_modules or [])]
        self.processor: Optional[MMCoconutProcessor] = None
        if wrapped:  # trained weights: HF's post_init must not initialise them (it skips init on the meta device)
            with torch.device("meta"):
                self.post_init()
        else:
            self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, tuple):  # output_loading_info=True
            model[0].model.vision.requires_grad_(not model[0].config.freeze_vision)
        else:  # loading replaces the parameters: freeze the tower again
            model.model.vision.requires_grad_(not model.config.freeze_vision)
        return model

    @classmethod
    def from_mmcoconut(cls, model: MMCoconut, config: MMCoconutConfig, processor=None):
        """Wrap a built (trained) MMCoconut without copying or re-initialising its weights."""
        obj = cls(config, model=model)
        obj.processor = processor
        return obj

    # ------------------------------------------------------------------------------------ model API
    def get_input_embeddings(self):
        return self.model.lm.get_input_embeddings()

    def forward(self, input_ids, attention_mask, labels=None, pixel_values=None, position_ids=None, **kwargs):
        """MMCoconut.forward: (loss, logits, n_passes); batches from mmcoconut's Collator pass straight in."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          pixel_values=pixel_values, position_ids=position_ids, **kwargs)

    def generate(self, input_ids, attention_mask, pixel_values=None, position_ids=None, max_new_tokens: int = 64,
                 dummy_latent: Optional[str] = None) -> list[list[int]]:
        """Greedy KV-cached generation with latent thoughts (MMCoconut.generate): new token ids per row."""
        return self.model.generate(input_ids, attention_mask, pixel_values, position_ids=position_ids,
                                   max_new_tokens=max_new_tokens, dummy_latent=dummy_latent)

    # -------------------------------------------------------------------------------------- answers
    def get_processor(self) -> MMCoconutProcessor:
        """The attached processor, else the one saved next to the weights (loaded once)."""
        if self.processor is None:
            where = self.config.name_or_path
            if not where:
                raise ValueError("no processor: pass processor=MMCoconutProcessor(...) or set model.processor")
            # running as the export's own code: the user trusted it, and the tokenizer's AutoConfig needs it too
            remote = not type(self).__module__.startswith("mmcoconut.")
            kw = {"trust_remote_code": True} if remote else {}
            self.processor = MMCoconutProcessor.from_pretrained(where, **kw)
        return self.processor

    @torch.no_grad()
    def answer(self, images, questions, choices=None, view: str = "coconut", n_latents: Optional[int] = None,
               max_new_tokens: Optional[int] = None, batch_size: int = 16, processor=None):
        """Ask questions about images. One image + one question (str) -> one dict; lists -> a list of dicts.

        choices: None, one list of choice strings (for every question) or one list per question. The prompt is the
        training format: the list is written into the question (" The choices are 0: ...") only when the model was
        trained with it (config.choices_in_question), else only used to map the answer to one of the choices.
        view: coconut (latent thoughts; n_latents default max_latent_stage * c_thought), dummy (zeros/random in
        the latent slots: an ablation), cot (writes the reasoning steps), nocot (answer only).
        Returns per item: text (generated), rationale (text before the answer marker), answer (text after it),
        choice / choice_index (None without choices), fallback (True when the fuzzy mapping chose), view,
        n_latents, n_tokens (generated). Runs on the model's device, in batches of `batch_size`.
        """
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        proc = processor or self.get_processor()
        if SpecialIds(**self.config.special_ids) != proc.ids:
            raise ValueError("the processor's tokenizer does not match this model's special token ids")
        single = isinstance(questions, str)
        questions = [questions] if single else list(questions)
        images = [images] if single or not isinstance(images, (list, tuple)) else list(images)
        if len(images) == 1 and len(questions) > 1:
            images = images * len(questions)
        if not choices:
            choices = [None] * len(questions)
        elif isinstance(choices[0], str):
            choices = [list(choices)] * len(questions)
        n = self.config.default_n_latents if n_latents is None else int(n_latents)
        dummy = self.config.dummy_latent if view == "dummy" else None
        steps = max_new_tokens or self.config.answer_max_new_tokens
        device = next(self.model.lm.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        try:
            for i in range(0, len(questions), batch_size):
                sl = slice(i, i + batch_size)
                batch = proc(images[sl], questions[sl], choices[sl], view=view, n_latents=n)
                new = self.model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                          batch["pixel_values"].to(device), max_new_tokens=steps, dummy_latent=dummy)
                for ids, ch in zip(new, choices[sl]):
                    res = proc.parse(proc.decode(ids), ch)
                    res.update(view=view, n_latents=n if view in ("coconut", "dummy") else 0, n_tokens=len(ids))
                    out.append(res)
        finally:
            self.train(was_training)
        return out[0] if single else out

    # ----------------------------------------------------------------------------------- save / push
    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """HF save_pretrained + the processor, the shipped code and the model card: one self-contained dir."""
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", None) or str(save_directory).rstrip("/").split("/")[-1]
            self.save_pretrained(save_directory, *args, **kwargs)
            return self.push_to_hub(repo_id, token=kwargs.get("token"))
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        write_code(save_directory)
        try:
            proc = self.get_processor()
        except (OSError, ValueError) as e:  # a model built in memory without one: say so, save the rest
            import warnings
            warnings.warn(f"save_pretrained: no processor saved ({e}); the export cannot answer() by itself")
        else:
            proc.auto_map = {"AutoProcessor": AUTO_MAP["AutoProcessor"]}
            proc.save_pretrained(save_directory)
            proc.image_processor.save_pretrained(save_directory)  # preprocessor_config.json: AutoImageProcessor
        write_model_card(save_directory, self.config)

    def push_to_hub(self, repo_id: str, *, commit_message: Optional[str] = None, private: Optional[bool] = None,
                    token=None, revision: Optional[str] = None, create_pr: bool = False,
                    max_shard_size="50GB", **_unused) -> object:
        """Upload the `save_pretrained` directory (weights, code, processor, model card) in one commit."""
        from pathlib import Path

        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi()
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, max_shard_size=max_shard_size)
            ops = [CommitOperationAdd(path_in_repo=f.relative_to(tmp).as_posix(), path_or_fileobj=str(f))
                   for f in sorted(Path(tmp).rglob("*")) if f.is_file()]
            return api.create_commit(repo_id=repo_id, operations=ops, commit_message=commit_message or
                                     "Upload mmcoconut model", token=token, revision=revision, create_pr=create_pr)


__all__ = ["MMCoconutForConditionalGeneration", "MMCoconutPreTrainedModel", "AUTO_MAP"]
