"""Special tokens shared by the loader (sequence building) and the model (embedding injection)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IMAGE = "<image>"
START_LATENT = "<|start-latent|>"
LATENT = "<|latent|>"
END_LATENT = "<|end-latent|>"
PAD = "<|pad|>"
ADDED_TOKENS = (IMAGE, START_LATENT, LATENT, END_LATENT)


def add_special_tokens(tokenizer) -> int:
    """Add the mmcoconut tokens (and a pad token if the tokenizer has none, as Llama's). Idempotent; returns
    #added."""
    missing = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
    request = {}
    if missing:
        request["additional_special_tokens"] = missing
    if tokenizer.pad_token is None:
        request["pad_token"] = PAD
    return tokenizer.add_special_tokens(request, replace_extra_special_tokens=False) if request else 0


@dataclass(frozen=True)
class SpecialIds:
    image: int
    start: int
    latent: int
    end: int
    pad: int
    eos: int
    bos: Optional[int] = None  # begins every sequence when the tokenizer adds one by default (Llama, Mistral)

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        vocab = tokenizer.get_vocab()
        missing = [t for t in ADDED_TOKENS if t not in vocab]
        if missing or tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} lacks special tokens {missing or ''}"
                f"{' pad' if tokenizer.pad_token_id is None else ''}{' eos' if tokenizer.eos_token_id is None else ''}; "
                "call mmcoconut.modeling.tokens.add_special_tokens(tokenizer) and resize the model's embeddings")
        return cls(image=vocab[IMAGE], start=vocab[START_LATENT], latent=vocab[LATENT], end=vocab[END_LATENT],
                   pad=tokenizer.pad_token_id, eos=tokenizer.eos_token_id, bos=leading_bos(tokenizer))


def leading_bos(tokenizer) -> Optional[int]:
    """The BOS id when the tokenizer starts every encoding with it (Llama 3, Mistral; as upstream Coconut's
    sequences for them begin), else None (GPT-2, Qwen2, SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None
