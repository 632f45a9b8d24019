"""What the continuous thoughts encode (Coconut's analysis): decode each one through the LM head and compare it
with the embeddings of the reasoning-step tokens it replaced.

Thought t (1-based) of a coconut prompt is the last hidden state that becomes the input embedding of latent
column t: for t = 1 the hidden state over START (after image and question), then the hidden state computed at
latent column t - 1. With c_thought = c, thoughts (j-1)c+1 .. jc replace step j. For each thought:
`topk` = softmax(lm_head(h)) top tokens with probabilities; `cos` = cosine similarity of h with the input
embedding (row of the input embedding table) of every token of the step it replaced (the step as training tokenizes it: step + "\\n").
Used by tools/inspect_latents.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def decode_thoughts(model, tokenizer, row: dict, steps: list[str], c_thought: int, topk: int = 5,
                    dummy_latent: Optional[str] = None) -> list[dict]:
    """row: a coconut prompt (input_ids list, pixel_values [3,H,W]); steps: the sample's steps. Returns one dict
    per thought: index, step (index into steps, or None past them), topk [(token, prob)], step_tokens, cos."""
    ids = torch.tensor([row["input_ids"]])
    lat = (ids[0] == model.ids.latent).nonzero().flatten().tolist()
    if not lat:
        return []
    dev = next(model.parameters()).device
    mask = torch.ones_like(ids)
    px = row["pixel_values"][None].to(dev, next(model.parameters()).dtype)
    st = model._multipass(ids.to(dev), mask.to(dev), px, None, dummy_latent, sync=False)
    hidden = st.hidden[0, lat[0] - 1: lat[0] - 1 + len(lat)].float()  # thought t feeds latent column lat[t-1]
    probs = F.softmax(model.lm.get_output_embeddings()(hidden.to(st.hidden.dtype)).float(), -1)
    wte = model.lm.get_input_embeddings().weight.float()
    out = []
    for t, (h, p) in enumerate(zip(hidden, probs)):
        j = t // c_thought
        top = p.topk(topk)
        entry = {"thought": t + 1, "step": j if j < len(steps) else None,
                 "topk": [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]}
        if j < len(steps):
            tok_ids = tokenizer.encode(steps[j] + "\n", add_special_tokens=False)
            entry["step_text"] = steps[j]
            entry["step_tokens"] = [tokenizer.decode([i]) for i in tok_ids]
            entry["cos"] = F.cosine_similarity(h[None], wte[tok_ids], dim=-1).tolist()
        out.append(entry)
    return out


def format_thoughts(key: str, question: str, thoughts: list[dict]) -> str:
    """Plain-text table of one sample's thoughts."""
    lines = [f"sample {key}: {question}"]
    lines.append(f"  {'thought':>7}  {'replaces':<22} top-k (prob) | cos to the replaced step's tokens")
    for e in thoughts:
        top = ", ".join(f"{t!r} {p:.2f}" for t, p in e["topk"])
        cos = " ".join(f"{t!r} {c:+.2f}" for t, c in zip(e.get("step_tokens", []), e.get("cos", [])))
        lines.append(f"  {e['thought']:>7}  {e.get('step_text', '-')[:22]:<22} {top} | {cos}")
    return "\n".join(lines)


def plot_thoughts(samples: list[dict], path) -> str:
    """One heat map per sample (rows: thoughts, labelled with their top-1 token; columns: the tokens of the
    replaced steps; colour: cosine similarity, blank where a thought did not replace that step)."""
    from .plots import _import_pyplot

    plt = _import_pyplot()
    samples = [s for s in samples if s["thoughts"]]
    if not samples:
        raise ValueError("no sample has continuous thoughts (stage 0, or no latent tokens in the prompts)")
    fig, axes = plt.subplots(len(samples), 1, figsize=(9, 1.2 + 0.55 * sum(len(s["thoughts"]) for s in samples)),
                             squeeze=False)
    for ax, s in zip(axes[:, 0], samples):
        cols, spans = [], {}
        for e in s["thoughts"]:
            if e["step"] is not None and e["step"] not in spans:
                spans[e["step"]] = (len(cols), len(cols) + len(e["step_tokens"]))
                cols += e["step_tokens"]
        grid = [[float("nan")] * len(cols) for _ in s["thoughts"]]
        for r, e in enumerate(s["thoughts"]):
            if e["step"] is not None:
                a, b = spans[e["step"]]
                grid[r][a:b] = e["cos"]
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), [repr(c)[1:-1] for c in cols], rotation=60, fontsize=8)
        ax.set_yticks(range(len(s["thoughts"])),
                      [f"t{e['thought']}: {e['topk'][0][0]!r} {e['topk'][0][1]:.2f}" for e in s["thoughts"]],
                      fontsize=8)
        ax.set_title(f"{s['key']}: {s['question'][:90]}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.03, label="cosine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
