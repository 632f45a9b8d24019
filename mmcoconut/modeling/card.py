"""The model card (README.md) of an export, generated from its MMCoconutConfig (pure Python; shipped with the export).

Front matter for the Hub (library, pipeline tag, tags, base models when they are Hub ids), then: what the model
is, base models, training data, curriculum, the four-view evaluation table when known, and how to load and ask.
"""
from __future__ import annotations

import json
from pathlib import Path

LM_NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
VISION_NAMES = {"clip_vision_model": "CLIP vision", "siglip_vision_model": "SigLIP vision"}


def _hub_id(ref) -> bool:
    """'gpt2' / 'openai/clip-vit-base-patch32' are Hub ids; local dirs are recorded as 'local:...' by the export."""
    return isinstance(ref, str) and bool(ref) and not ref.startswith(("local:", ".", "/", "~")) and ref.count("/") <= 1


def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def eval_table(results: dict) -> str:
    """Markdown table of an eval_results.json-like dict ({"views": {view: {mc, da, answer_len, n, fallback}}})."""
    views = (results or {}).get("views") or {}
    if not views:
        return ""
    rows = ["| view | MC | DA | answer tokens | n | fuzzy fallbacks |", "|---|---|---|---|---|---|"]
    for view, r in views.items():
        rows.append(f"| {view} | {_fmt(r.get('mc'))} | {_fmt(r.get('da'))} | {_fmt(r.get('answer_len'), '.1f')} | "
                    f"{_fmt(r.get('n'))} | {_fmt(r.get('fallback'))} |")
    return "\n".join(rows)


def render(config) -> str:
    """README.md text for an MMCoconutConfig."""
    run = config.run_config or {}
    model, data, cur, train = (run.get(k) or {} for k in ("model", "data", "curriculum", "train"))
    name = train.get("name") or "mmcoconut model"
    bases = [b for b in (model.get("lm_id"), model.get("vision_id")) if _hub_id(b)]
    meta = ["---", "library_name: transformers", "pipeline_tag: image-text-to-text",
            "tags: [mmcoconut, coconut, latent-reasoning, multimodal, custom_code]"]
    if bases:
        meta.append("base_model:")
        meta += [f"- {b}" for b in bases]
    meta.append("---")
    t, v = config.text_config, config.vision_config
    lm_name = LM_NAMES.get(t.model_type, t.model_type)
    vision_name = VISION_NAMES.get(v.model_type, v.model_type)
    lines = [
        f"# {name}", "",
        f"A multimodal [Coconut](https://arxiv.org/abs/2412.06769) model trained with mmcoconut: {lm_name} reads "
        f"{vision_name.split()[0]} image features and a question, reasons in continuous "
        "latent thoughts (its last hidden state fed back as the next input), then answers.", "",
        "## Base models", "",
        f"- language model: `{model.get('lm_id', '?')}` ({lm_name}, {t.num_hidden_layers} layers, {t.hidden_size} "
        f"wide, vocabulary {t.vocab_size} incl. the latent tokens)",
        f"- vision tower: `{model.get('vision_id', '?')}` ({vision_name}, {v.num_hidden_layers} layers, image "
        f"{v.image_size} px, {'frozen' if config.freeze_vision else 'tuned'}), "
        f"{config.num_image_tokens} image token(s) ({config.image_tokens}), projector `{config.projector}`", "",
        "## Training data", "",
        f"- train: `{data.get('train_shards') or '?'}`",
        f"- validation: `{data.get('val_shards') or '?'}`", "",
        "## Curriculum", "",
        f"Coconut curriculum: at stage k the first k reasoning steps become k x {config.c_thought} latent tokens; "
        f"{config.max_latent_stage} latent stage(s); "
        f"{cur.get('epochs_per_stage', '?')} epoch(s) per stage"
        + (f" after {cur['stage0_epochs']} CoT epoch(s)" if cur.get("stage0_epochs") else "")
        + f", {train.get('num_epochs', '?')} epochs in all; uniform_prob {cur.get('uniform_prob', '?')}, "
        f"pad_latent_to_max {config.pad_latent_to_max}, lr {train.get('lr', '?')}."
        + ("" if config.coconut else " (Plain CoT training: no latents.)"), "",
        "## Evaluation", "",
    ]
    table = eval_table(config.eval_results or {})
    if table:
        res = config.eval_results
        lines += [f"Four views on `{res.get('shards', '?')}` ({res.get('n_latents', '?')} latents in coconut/dummy): "
                  "*nocot* answer only, *cot* written steps, *coconut* latent thoughts, *dummy* latents replaced "
                  "(the gap to coconut shows whether the thoughts carry information). MC / DA: the official A-OKVQA "
                  "metrics.", "", table, ""]
    else:
        lines += ["No evaluation was recorded with this export (`mmcoconut-eval EXPORT SHARDS` writes the table).", ""]
    lines += [
        "## Use", "",
        "```python",
        "from transformers import AutoModel",
        "",
        "model = AutoModel.from_pretrained(\"PATH_OR_REPO\", trust_remote_code=True)",
        "out = model.answer(\"cat.jpg\", \"What is the animal doing?\",",
        "                   choices=[\"sleeping\", \"eating\", \"running\", \"jumping\"])",
        "print(out[\"choice\"], out[\"rationale\"])",
        "```", "",
        f"`view=\"coconut\"` (default, {config.default_n_latents} latent(s); `n_latents=` to change), `\"cot\"` "
        "(written steps), `\"nocot\"`, `\"dummy\"`. `AutoProcessor.from_pretrained(..., trust_remote_code=True)` "
        "gives the processor (prompt format, image preprocessing). With mmcoconut installed: "
        "`mmcoconut-ask --model PATH --image cat.jpg --question \"...\" --choices \"a|b|c|d\" --show-steps`.", "",
        f"Exported by mmcoconut {config.mmcoconut_version or '?'}.", "",
    ]
    return "\n".join(meta) + "\n\n" + "\n".join(lines)


def write_model_card(out_dir, config) -> Path:
    path = Path(out_dir) / "README.md"
    path.write_text(render(config), encoding="utf-8")
    return path


def read_eval_results(path) -> dict:
    """The parts of an eval_results.json the card shows."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    keep = ("mc", "da", "answer_len", "n", "fallback", "n_latents")
    return {"views": {v: {k: r.get(k) for k in keep} for v, r in (d.get("views") or {}).items()},
            "n_latents": d.get("n_latents"), "shards": d.get("shards")}


__all__ = ["render", "write_model_card", "eval_table", "read_eval_results"]
