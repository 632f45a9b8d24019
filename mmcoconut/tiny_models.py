"""Tiny randomly initialised language models (every supported family), vision towers (CLIP, SigLIP) and a locally
trained BPE tokenizer, written as ordinary Hugging Face dirs.

No weights can be downloaded in CI, so tests and the demo load these through exactly the code path real users take
with `gpt2`, `meta-llama/Llama-3.2-1B`, `Qwen/Qwen2.5-0.5B`, `openai/clip-vit-base-patch32`, ...:
`from_pretrained(<dir>)` through the Auto classes. Each family's tokenizer behaves like its real one where the model
code cares: GPT-2 (no BOS added, mmcoconut tokens and a pad token in the dir), Llama (BOS on every encoding, no pad
token: one is added at build time, so the table is resized), Qwen2 (no BOS, pad = EOS, spare embedding rows past
the tokenizer: the mmcoconut tokens are added into them), Mistral (BOS, no pad, untied output head, sliding window).
Llama, Qwen2 and Mistral use grouped-query attention (half as many K/V heads as query heads).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

from .modeling.tokens import ADDED_TOKENS, PAD

# lm: n_embd, n_layer, n_head, n_positions, dropout; vision: hidden, layers, heads, image_size, patch_size
PRESETS = {
    "test": dict(n_embd=32, n_layer=2, n_head=2, n_positions=256, dropout=0.1,
                 v_hidden=32, v_layers=1, v_heads=2, image_size=32, patch_size=16, vocab_size=400),
    "demo": dict(n_embd=128, n_layer=4, n_head=4, n_positions=256, dropout=0.0,  # dropout slows a short demo
                 v_hidden=64, v_layers=2, v_heads=2, image_size=64, patch_size=32, vocab_size=600),
}
ARCHS = ("gpt2", "llama", "qwen2", "mistral")
VISIONS = ("clip", "siglip")
EOS = "<|endoftext|>"
# family -> (bos, eos, pad, BOS on every encoding, mmcoconut tokens in the saved dir, tied output head)
TOKENS = {
    "gpt2": (EOS, EOS, PAD, False, True, True),
    "llama": ("<|begin_of_text|>", "<|end_of_text|>", None, True, True, True),
    "qwen2": (None, EOS, EOS, False, False, True),
    "mistral": ("<s>", "</s>", None, True, False, False),
}
SPARE_ROWS = 16  # qwen2: embedding rows past the tokenizer (Qwen2.5's table is larger than its vocabulary)


def train_tokenizer(texts: Iterable[str], vocab_size: int, arch: str = "gpt2"):
    """Byte-level BPE trained locally, wrapped as `arch`'s tokenizer would be (see TOKENS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

    bos, eos, pad, add_bos, with_added, _ = TOKENS[arch]
    specials = list(dict.fromkeys(t for t in (eos, bos) if t))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts), trainer)
    if arch == "gpt2":
        tok = GPT2TokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    else:
        if add_bos:
            bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, bpe.token_to_id(bos))])
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad)
    if with_added:
        request = {"additional_special_tokens": list(ADDED_TOKENS)}
        if pad is not None:
            request["pad_token"] = pad
        tok.add_special_tokens(request)
    return tok


def lm_config(arch: str, p: dict, tok):
    """A tiny random config of family `arch` (preset sizes `p`), its vocabulary fitting `tok`."""
    import transformers

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=len(tok), n_embd=p["n_embd"], n_layer=p["n_layer"],
                                       n_head=p["n_head"], n_positions=p["n_positions"], resid_pdrop=p["dropout"],
                                       embd_pdrop=p["dropout"], attn_pdrop=p["dropout"], **ids)
    heads = 2 * p["n_head"]
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    extra = {"sliding_window": 4 * p["n_positions"]} if arch == "mistral" else {}
    return cls(vocab_size=len(tok) + (SPARE_ROWS if arch == "qwen2" else 0), hidden_size=p["n_embd"],
               intermediate_size=2 * p["n_embd"], num_hidden_layers=p["n_layer"], num_attention_heads=heads,
               num_key_value_heads=heads // 2, max_position_embeddings=p["n_positions"],
               attention_dropout=p["dropout"], tie_word_embeddings=TOKENS[arch][5], **ids, **extra)


def _save_vision(vision: str, p: dict, out: str) -> None:
    import transformers

    from .factory import clip_image_processor_class

    size = p["image_size"]
    shape = dict(hidden_size=p["v_hidden"], intermediate_size=2 * p["v_hidden"], num_hidden_layers=p["v_layers"],
                 num_attention_heads=p["v_heads"], image_size=size, patch_size=p["patch_size"])
    if vision == "clip":
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**shape, projection_dim=p["v_hidden"])) \
            .save_pretrained(out)
        processor = clip_image_processor_class()(size={"shortest_edge": size}, crop_size={"height": size,
                                                                                          "width": size})
    else:
        transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**shape)).save_pretrained(out)
        from transformers.utils import is_torchvision_available
        cls = transformers.SiglipImageProcessor if is_torchvision_available() \
            or not hasattr(transformers, "SiglipImageProcessorPil") else transformers.SiglipImageProcessorPil
        processor = cls(size={"height": size, "width": size})
    processor.save_pretrained(out)


def make_tiny_models(out_dir: str | Path, preset: str = "test", texts: Optional[list[str]] = None,
                     seed: int = 0, force: bool = False, arch: str = "gpt2", vision: str = "clip") -> dict[str, str]:
    """Write `<out>/lm` (an `arch` LM + tokenizer) and `<out>/vision` (a `vision` tower + image processor).

    Skips the work when `<out>/tiny.json` records the same preset, family, seed and tokenizer training text.
    Returns {"lm": dir, "vision": dir}.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; choose from {sorted(PRESETS)}")
    if arch not in ARCHS or vision not in VISIONS:
        raise ValueError(f"unknown tiny model --arch {arch!r} / --vision {vision!r}; choose from {ARCHS} / {VISIONS}")
    p = PRESETS[preset]
    out = Path(out_dir)
    dirs = {"lm": str(out / "lm"), "vision": str(out / "vision")}
    if texts is None:
        from .data.synthetic import synthetic_texts
        texts = synthetic_texts(2000, seed)
    texts = list(texts)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]  # the tokenizer's training text
    stamp = {"preset": preset, "seed": seed, "texts_sha256": digest, **p}
    if (arch, vision) != ("gpt2", "clip"):  # the GPT-2 + CLIP stamp stays what it was (existing dirs stay valid)
        stamp.update(arch=arch, vision=vision)
    marker = out / "tiny.json"
    if not force and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return dirs

    torch.manual_seed(seed)
    tok = train_tokenizer(texts, p["vocab_size"], arch)
    AutoModelForCausalLM.from_config(lm_config(arch, p, tok)).save_pretrained(dirs["lm"])
    tok.save_pretrained(dirs["lm"])
    _save_vision(vision, p, dirs["vision"])
    marker.write_text(json.dumps(stamp, indent=1))
    return dirs
