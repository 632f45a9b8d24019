"""Coconut curriculum: one shard sample -> token ids + labels for a stage (train) or an eval view.

Follows facebookresearch/coconut `dataset.py` (`get_cot_latent_dataset` / `get_question_latent_dataset`)
token for token, with `[<image>] * n_image_tokens` in front (see docs/internals.md, "Token sequence").
"""
from __future__ import annotations

import multiprocessing as mp
import random
from typing import Optional

from ..config import CurriculumConfig
from ..modeling.prompt import answer_text, prompt_ids, question_text, view_latents
from ..modeling.tokens import SpecialIds

IGNORE = -100
VIEWS = ("train", "cot", "nocot", "coconut", "dummy")


class SharedStage:
    """Curriculum stage shared with DataLoader workers (like open_clip's SharedEpoch).

    Backed by a `multiprocessing.Value`, so a worker started before a `set()` still sees the new value.
    """

    def __init__(self, stage: int = 0):
        self.value = mp.Value("i", int(stage))

    def set(self, stage: int) -> None:
        self.value.value = int(stage)

    def get(self) -> int:
        return self.value.value


class OverlongError(ValueError):
    """A sequence longer than model.max_length (data.overlong: error -> raised, skip -> counted and dropped)."""


class NoStepsError(ValueError):
    """A training / val-loss sample without reasoning steps (missing, null or empty `steps`): skipped and counted
    as `no_steps` by the loaders, never trained with an empty rationale (curriculum.no_cot needs no steps)."""


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """Per-sample RNG: a function of (seed, epoch, key) only, so resumed / re-sharded runs draw the same."""
    return random.Random(f"{seed}:{epoch}:{key}")  # str seeds are hashed with sha512: stable across runs


def tokenize_sample(sample: dict, tokenizer) -> dict:
    """Tokenize question / steps / answer once; cached in `sample["_tok"]` (stage only picks pieces)."""
    tok = sample.get("_tok")
    if tok is None:
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        tok = sample["_tok"] = {
            "question": enc(question_text(sample["question"])),
            "steps": [enc(s + "\n") for s in sample.get("steps") or []],
            "answer": enc(answer_text(sample.get("answer", ""))) + [tokenizer.eos_token_id],
        }
    return tok


def _latent_plan(n_steps: int, stage: int, cur: CurriculumConfig, rng: Optional[random.Random]) -> tuple[int, int]:
    """(steps skipped, latent tokens) for a coconut training sample at `stage` (upstream semantics)."""
    if rng is not None and cur.uniform_prob > 0 and rng.random() < cur.uniform_prob:
        stage = rng.choice(range(n_steps + 1))
    if stage > cur.max_latent_stage:
        cap = cur.max_latent_stage if cur.pad_latent_to_max else min(n_steps, cur.max_latent_stage)
        return n_steps, cap * cur.c_thought
    return min(stage, n_steps), stage * cur.c_thought


def stage_for_epoch(cur: CurriculumConfig, epoch: int) -> int:
    """The curriculum stage of `epoch`: `stage0_epochs` epochs of stage 0, then `epochs_per_stage` per stage up to
    `max_latent_stage` (with stage0_epochs unset, upstream's `epoch // epochs_per_stage`); 0 for CoT / no-CoT runs.
    """
    if not cur.coconut or cur.no_cot:
        return 0
    first = cur.epochs_per_stage if cur.stage0_epochs is None else cur.stage0_epochs
    if epoch < first:
        return 0
    return min(1 + (epoch - first) // cur.epochs_per_stage, cur.max_latent_stage)


def cot_markers(cur: CurriculumConfig) -> bool:
    """Whether the cot view writes START END (zero latents) after the question: yes for a model trained with
    `coconut: true`, whose stage-0 sequences all carry the markers (upstream), no for a plain CoT model."""
    return bool(cur.coconut and not cur.no_cot)


def eval_latents(n_steps: int, stage: int, cur: CurriculumConfig) -> int:
    """Latents in an eval prompt at `stage` (upstream get_question_latent_dataset)."""
    cap = cur.max_latent_stage if cur.pad_latent_to_max else min(cur.max_latent_stage, n_steps)
    return min(cap, stage) * cur.c_thought


def _check_length(n: int, max_length: int, key: str, what: str) -> None:
    if n > max_length:
        raise OverlongError(f"sample {key!r}: {what} has {n} tokens > model.max_length={max_length} "
                            "(raise model.max_length or set data.overlong=skip)")


def _check_steps(sample: dict, key: str) -> None:
    steps = sample.get("steps")
    if steps is not None and not (isinstance(steps, list) and all(isinstance(s, str) for s in steps)):
        raise ValueError(f"sample {key!r}: steps is not a list of strings")
    if not steps:
        what = "empty" if steps == [] else "missing"
        raise NoStepsError(f"sample {key!r} has no reasoning steps ('steps' is {what})")


def build_example(sample: dict, tokenizer, ids: SpecialIds, *, view: str, stage: int, cur: CurriculumConfig,
                  n_image_tokens: int, rng: Optional[random.Random], max_length: int, key: str,
                  n_latents: Optional[int] = None) -> dict:
    """Full sequence with labels. view: train (curriculum per `cur`) | cot | nocot | coconut | dummy.

    Eval views coconut/dummy skip the first `stage` steps and use `n_latents` latents (default: stage*c_thought
    as in training). Labels are -100 on image, question, START/LATENT/END. Raises OverlongError, and for the
    train view (unless curriculum.no_cot) NoStepsError when the sample has no steps.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from {VIEWS}")
    if view == "train" and not cur.no_cot:
        _check_steps(sample, key)
    tok = tokenize_sample(sample, tokenizer)
    steps = tok["steps"]
    markers = True
    if view == "train":
        if cur.no_cot:
            skip, n_lat, markers = len(steps), 0, False
        elif not cur.coconut:
            skip, n_lat, markers = 0, 0, False
        else:
            skip, n_lat = _latent_plan(len(steps), stage, cur, rng)
    elif view == "cot":
        skip, n_lat, markers = 0, 0, cot_markers(cur)
    elif view == "nocot":
        skip, n_lat, markers = len(steps), 0, False
    else:  # coconut / dummy: the same sequence, the model decides what fills the latents
        skip = min(stage, len(steps))
        n_lat = stage * cur.c_thought if n_latents is None else n_latents
    prefix = prompt_ids(tok["question"], ids, n_image_tokens, n_lat if markers else None)
    target = [t for s in steps[skip:] for t in s] + tok["answer"]
    input_ids = prefix + target
    _check_length(len(input_ids), max_length, key, f"{view} sequence (stage {stage}, {n_lat} latents)")
    return {"input_ids": input_ids, "labels": [IGNORE] * len(prefix) + target, "n_latents": n_lat}


def build_prompt(sample: dict, tokenizer, ids: SpecialIds, *, view: str, stage: int, cur: CurriculumConfig,
                 n_image_tokens: int, max_length: int, key: str, n_latents: Optional[int] = None) -> dict:
    """Generation prompt: up to and including END (coconut/dummy; cot too when `cot_markers`), else up to the
    question.

    coconut/dummy use `n_latents` latents, default `eval_latents(len(steps), stage, cur)` (upstream).
    Returns dict(input_ids, n_latents). Raises OverlongError.
    """
    if view not in ("cot", "nocot", "coconut", "dummy"):
        raise ValueError(f"unknown generation view {view!r}; choose from cot, nocot, coconut, dummy")
    tok = tokenize_sample(sample, tokenizer)
    n_lat = 0
    if view in ("coconut", "dummy"):
        n_lat = eval_latents(len(tok["steps"]), stage, cur) if n_latents is None else n_latents
    prompt = prompt_ids(tok["question"], ids, n_image_tokens, view_latents(view, n_lat, cot_markers(cur)))
    _check_length(len(prompt), max_length, key, f"{view} prompt ({n_lat} latents)")
    return {"input_ids": prompt, "n_latents": n_lat}
