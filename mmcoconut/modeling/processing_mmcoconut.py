"""MMCoconutProcessor: tokenizer + CLIP image processor + the prompt format of an MMCoconut model.

Shipped inside every export: `AutoProcessor.from_pretrained(export, trust_remote_code=True)`.

    proc(images, questions, choices=None, view="coconut", n_latents=None) -> BatchFeature(input_ids, attention_mask,
        pixel_values): prompts `[<image>]*n + question (+ " The choices are 0: ..." when the model was trained with the
        choice list in the question: choices_in_question) + "\\n" [+ START LATENT*n END]`, left-padded so every
        prompt ends at the last column (what `MMCoconut.generate` expects)
    proc.parse(text, choices) -> {text, rationale, answer, choice, choice_index, fallback}
Views: coconut (n latents, default max_latent_stage * c_thought), dummy (the same prompt; the model replaces the
latents), cot (START END after the question for a coconut-trained model; the model writes the steps), nocot.
"""
from __future__ import annotations

from typing import Optional, Sequence

from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature

from .choices import map_to_choice
from .images import load_rgb
from .prompt import extract_answer, extract_rationale, format_question, prompt_ids, question_text, view_latents
from .tokens import SpecialIds


def _as_list(x, n: Optional[int] = None) -> list:
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x] * (n or 1)


class MMCoconutProcessor(ProcessorMixin):
    """Tokenizer + image processor + prompt format (n_image_tokens, c_thought, max_latent_stage, cot_markers,
    choices_in_question: whether the question lists its choices; true for processors saved before it was recorded)."""

    def __init__(self, image_processor=None, tokenizer=None, n_image_tokens: int = 1, c_thought: int = 1,
                 max_latent_stage: int = 0, cot_markers: bool = True, choices_in_question: bool = True,
                 chat_template=None, **kwargs):
        self.n_image_tokens = int(n_image_tokens)
        self.choices_in_question = bool(choices_in_question)
        self.c_thought = int(c_thought)
        self.max_latent_stage = int(max_latent_stage)
        self.cot_markers = bool(cot_markers)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.ids = SpecialIds.from_tokenizer(tokenizer)

    @classmethod
    def from_config(cls, config, image_processor, tokenizer) -> "MMCoconutProcessor":
        """The processor matching an MMCoconutConfig."""
        return cls(image_processor, tokenizer, n_image_tokens=config.num_image_tokens, c_thought=config.c_thought,
                   max_latent_stage=config.max_latent_stage, cot_markers=config.cot_markers,
                   choices_in_question=config.choices_in_question is not False)

    @property
    def default_n_latents(self) -> int:
        return max(0, self.max_latent_stage) * self.c_thought

    # ------------------------------------------------------------------------------------------- prompts
    def prompt(self, question: str, choices: Optional[Sequence[str]] = None, view: str = "coconut",
               n_latents: Optional[int] = None) -> list[int]:
        """Token ids of one generation prompt (the same ids mmcoconut.data.curriculum.build_prompt builds). The choice
        list is written into the question only for a model trained that way (`choices_in_question`), else removed."""
        n = self.default_n_latents if n_latents is None else int(n_latents)
        if n < 0:
            raise ValueError(f"n_latents must be >= 0, got {n}")
        text = question_text(format_question(question, choices, self.choices_in_question))
        q = self.tokenizer.encode(text, add_special_tokens=False)
        return prompt_ids(q, self.ids, self.n_image_tokens, view_latents(view, n, self.cot_markers))

    def __call__(self, images=None, questions=None, choices=None, view: str = "coconut",
                 n_latents: Optional[int] = None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        """A left-padded generation batch: input_ids, attention_mask, pixel_values (one image per question)."""
        if questions is None:
            questions = kwargs.pop("text", None)
        if images is None or questions is None:
            raise ValueError("MMCoconutProcessor needs images and questions (one image per question)")
        questions = _as_list(questions)
        images = _as_list(images, len(questions))
        if choices is None or (choices and isinstance(choices[0], str)):
            choices = [choices] * len(questions)
        if not (len(images) == len(questions) == len(choices)):
            raise ValueError(f"got {len(images)} images, {len(questions)} questions and {len(choices)} choice lists; "
                             "give one of each per item")
        rows = [self.prompt(q, c, view, n_latents) for q, c in zip(questions, choices)]
        padded = self.tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt")
        pixels = self.image_processor([load_rgb(im) for im in images], return_tensors="pt")["pixel_values"]
        data = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "pixel_values": pixels}
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ------------------------------------------------------------------------------------------- answers
    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def parse(self, text: str, choices: Optional[Sequence[str]] = None) -> dict:
        """Generated text -> {text, rationale, answer, choice, choice_index, fallback}. With choices, the answer is
        mapped to one (index, exact text, then the closest text: fallback=True); without, choice* and fallback are
        None."""
        answer = extract_answer(text)
        out = {"text": text, "rationale": extract_rationale(text), "answer": answer, "choice": None,
               "choice_index": None, "fallback": None}
        if choices:
            idx, fallback = map_to_choice(answer, list(choices))
            out.update(choice=choices[idx], choice_index=idx, fallback=fallback)
        return out


__all__ = ["MMCoconutProcessor"]
