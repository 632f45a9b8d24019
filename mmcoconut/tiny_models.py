"""Tiny randomly initialised GPT-2 / CLIP-vision / BPE tokenizer written as ordinary Hugging Face dirs.

No weights can be downloaded in CI, so tests and the demo load these through exactly the code path real users
take with `gpt2` and `openai/clip-vit-base-patch32`: `from_pretrained(<dir>)`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

from .modeling.tokens import ADDED_TOKENS, PAD

# name -> (lm: n_embd, n_layer, n_head, n_positions, dropout; vision: hidden, layers, heads, image_size, patch_size)
PRESETS = {
    "test": dict(n_embd=32, n_layer=2, n_head=2, n_positions=256, dropout=0.1,
                 v_hidden=32, v_layers=1, v_heads=2, image_size=32, patch_size=16, vocab_size=400),
    "demo": dict(n_embd=128, n_layer=4, n_head=4, n_positions=256, dropout=0.0,  # dropout slows a short demo
                 v_hidden=64, v_layers=2, v_heads=2, image_size=64, patch_size=32, vocab_size=600),
}
EOS = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained locally, wrapped as a GPT-2 tokenizer with mmcoconut's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts), trainer)
    tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    tok.add_special_tokens({"additional_special_tokens": list(ADDED_TOKENS), "pad_token": PAD})
    return tok


def make_tiny_models(out_dir: str | Path, preset: str = "test", texts: Optional[list[str]] = None,
                     seed: int = 0, force: bool = False) -> dict[str, str]:
    """Write `<out>/lm` (GPT-2 + tokenizer) and `<out>/vision` (CLIP vision + image processor).

    Skips the work when `<out>/tiny.json` records the same preset, seed and tokenizer training text.
    Returns {"lm": dir, "vision": dir}.
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    from .factory import clip_image_processor_class

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir)
    dirs = {"lm": str(out / "lm"), "vision": str(out / "vision")}
    if texts is None:
        from .data.synthetic import synthetic_texts
        texts = synthetic_texts(2000, seed)
    texts = list(texts)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]  # the tokenizer's training text
    stamp = {"preset": preset, "seed": seed, "texts_sha256": digest, **p}
    marker = out / "tiny.json"
    if not force and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return dirs

    torch.manual_seed(seed)
    tok = train_tokenizer(texts, p["vocab_size"])
    lm_cfg = GPT2Config(vocab_size=len(tok), n_embd=p["n_embd"], n_layer=p["n_layer"], n_head=p["n_head"],
                        n_positions=p["n_positions"], resid_pdrop=p["dropout"], embd_pdrop=p["dropout"],
                        attn_pdrop=p["dropout"], bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(lm_cfg).save_pretrained(dirs["lm"])
    tok.save_pretrained(dirs["lm"])

    v_cfg = CLIPVisionConfig(hidden_size=p["v_hidden"], intermediate_size=2 * p["v_hidden"],
                             num_hidden_layers=p["v_layers"], num_attention_heads=p["v_heads"],
                             image_size=p["image_size"], patch_size=p["patch_size"], projection_dim=p["v_hidden"])
    CLIPVisionModel(v_cfg).save_pretrained(dirs["vision"])
    size = p["image_size"]
    processor = clip_image_processor_class()(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor.save_pretrained(dirs["vision"])
    marker.write_text(json.dumps(stamp, indent=1))
    return dirs
