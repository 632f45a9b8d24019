"""The prompt and answer format, in one place (pure Python: shipped inside Hugging Face exports).

A sequence is `[BOS] + [<image>] * n_img + tok(question + "\\n") [+ START + LATENT * n + END] + steps +
tok("### " + answer)` (BOS only for tokenizers that begin every encoding with one, SpecialIds.bos)
(docs/internals.md, "Token sequence"). A multiple-choice question carries its choices in the text
(`question + choices_suffix(choices)` = "... The choices are 0: cat, 1: dog") when the model was trained that way:
whether it was (`choices_in_question`) is part of the model, recorded in the run config (data.choices_in_question)
and the export (MMCoconutConfig, processor). `format_question` builds that format from any question + choices;
the data pipeline (data/pipeline.py, data/curriculum.py), evaluation and the inference processor
(processing_mmcoconut.py) all build prompts and read answers through these functions.
"""
from __future__ import annotations

from typing import Optional, Sequence

ANSWER_MARK = "###"
GENERATION_VIEWS = ("nocot", "cot", "coconut", "dummy")


def choices_suffix(choices: Sequence[str]) -> str:
    """' The choices are 0: cat, 1: dog, ...' — appended to the question."""
    return " The choices are " + ", ".join(f"{i}: {c}" for i, c in enumerate(choices))


def lists_choices(question: str, choices: Optional[Sequence[str]]) -> Optional[bool]:
    """Whether `question` carries its choice list (ends with choices_suffix); None without choices."""
    return question.endswith(choices_suffix(choices)) if choices else None


def format_question(question: str, choices: Optional[Sequence[str]], choices_in_question: Optional[bool]) -> str:
    """The question as a model trained with (True) or without (False) the choice list in the question reads it: the
    list is added or removed; None (format unknown: runs from before it was recorded) or no choices: as given."""
    if choices_in_question is None or not choices:
        return question
    suffix = choices_suffix(choices)
    base = question[:-len(suffix)] if question.endswith(suffix) else question
    return base + suffix if choices_in_question else base


def question_text(question: str) -> str:
    """The question line as trained: the question (in its trained format: format_question), a newline."""
    return question + "\n"


def view_latents(view: str, n_latents: int, cot_markers: bool) -> Optional[int]:
    """Latent tokens between START and END in a generation prompt of `view`, or None for no markers at all.

    coconut / dummy: `n_latents`; cot: 0 (START END right after the question) for a model trained with
    `coconut: true`, whose stage-0 sequences carry the markers, else no markers; nocot: no markers.
    """
    if view not in GENERATION_VIEWS:
        raise ValueError(f"unknown generation view {view!r}; choose from {', '.join(GENERATION_VIEWS)}")
    if view in ("coconut", "dummy"):
        return int(n_latents)
    if view == "cot" and cot_markers:
        return 0
    return None


def prompt_ids(question_ids: list[int], ids, n_image_tokens: int, n_latents: Optional[int]) -> list[int]:
    """`[BOS] + [<image>] * n_image_tokens + question_ids`, then `START + LATENT * n_latents + END` unless n_latents
    is None. `ids`: mmcoconut.modeling.tokens.SpecialIds (BOS: ids.bos when not None)."""
    bos = getattr(ids, "bos", None)
    out = ([] if bos is None else [bos]) + [ids.image] * n_image_tokens + list(question_ids)
    if n_latents is not None:
        out += [ids.start] + [ids.latent] * n_latents + [ids.end]
    return out


def answer_text(answer) -> str:
    """The answer line as trained (the EOS token follows it)."""
    return f"{ANSWER_MARK} {answer}"


def extract_answer(text: str) -> str:
    """The text after the last '### ' (the answer marker); the whole text if the marker never appears."""
    i = text.rfind(ANSWER_MARK)
    return (text[i + len(ANSWER_MARK):] if i >= 0 else text).strip()


def extract_rationale(text: str) -> str:
    """The generated reasoning steps: the text before the last answer marker (all of it without a marker)."""
    i = text.rfind(ANSWER_MARK)
    return (text[:i] if i >= 0 else text).strip()
