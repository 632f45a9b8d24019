"""Batched greedy generation with latent thoughts: KV-cached (`generate`) and a full-recompute reference.

Prompts come from GenerationCollator: one contiguous run of real tokens per row (mask 1), padded on the left and,
when rows carry different latent counts, on the right (their first latents share one column, as in training).
The view is in the prompt itself: coconut (image, question, START, n LATENT, END), dummy (same, with
`dummy_latent`), cot / nocot (no latent markers; the model writes the steps and/or "### answer"). The prompt is
encoded with the same multi-pass machinery as training (MMCoconut._multipass); each row's first new token comes
from its last real column, then tokens are decoded one at a time from the cache (masked pad columns in between
are never attended to, and positions continue from the row's last real position, so a row's tokens equal
its one-by-one generation).
Per-row stopping: a row that emitted EOS keeps feeding the pad token with attention mask 0 (it influences nothing)
until all rows are done or max_new_tokens is reached. With sharded weights (the engine installs `model.agree_stop`)
the "stop" decision is agreed so ranks make the same number of LM calls (and the prompt's pass count through
`model.agree_pass_count`).
Generation also stops before positions would exceed the LM's longest position (GPT-2's n_positions, else
max_position_embeddings); with a sliding-window LM (Mistral), a prompt + budget longer than the window is refused.
"""
from __future__ import annotations

from typing import Optional

import torch

from .families import check_window, max_positions


def _last_real(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] column of each row's last real token; checks that every row is one contiguous non-empty run."""
    m = attention_mask.bool()
    T = m.shape[1]
    cols = torch.arange(T, device=m.device)
    last = torch.where(m, cols, -1).max(1).values
    first = torch.where(m, cols, T).min(1).values
    if bool((last < 0).any()) or bool((m.sum(1) != last - first + 1).any()):
        raise ValueError("generation prompts must be padded rows with one contiguous run of real tokens each "
                         "(use mmcoconut.data.collate.GenerationCollator)")
    return last


def _all_stop(model, stop: bool) -> bool:
    """True when this rank (and, with an engine that shards weights, every rank) is done."""
    return model.agree_stop(stop) if model.agree_stop is not None else stop


def _budget(model, last_pos: torch.Tensor, max_new_tokens: int) -> int:
    """max_new_tokens capped so that no position exceeds the LM's longest position - 1."""
    limit = max_positions(model.lm.config)
    if limit is None or last_pos.numel() == 0:
        return max_new_tokens
    return max(0, min(max_new_tokens, limit - 1 - int(last_pos.max())))


def _finish(tokens: list[torch.Tensor], eos: int) -> list[list[int]]:
    if not tokens:
        return []
    out = []
    for row in torch.stack(tokens, 1).tolist():
        out.append(row[:row.index(eos)] if eos in row else row)
    return out


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values=None,
             position_ids: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
             dummy_latent: Optional[str] = None) -> list[list[int]]:
    """Greedy KV-cached generation -> new token ids per row (EOS and everything after it excluded)."""
    last = _last_real(attention_mask)
    B = input_ids.shape[0]
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    rows = torch.arange(B, device=input_ids.device)
    last_pos = position_ids[rows, last]
    steps = _budget(model, last_pos, max_new_tokens)
    sync = model.agree_stop is not None
    if B == 0 or (steps == 0 and not sync):
        return [[] for _ in range(B)]
    check_window(model.lm.config, input_ids.shape[1] + steps, "a generation (prompt + max_new_tokens)")
    st = model._multipass(input_ids, attention_mask, pixel_values, position_ids, dummy_latent)
    eos, pad = model.ids.eos, model.ids.pad
    top = (max_positions(model.lm.config) or 2**62) - 1
    head = model.lm.get_output_embeddings()
    logits = head(st.hidden[rows, last])
    mask, pos = st.mask, last_pos[:, None]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens, step, nxt = [], 0, torch.full((B,), eos, dtype=torch.long, device=input_ids.device)
    while True:
        if step < steps:  # (when ranks agree on stopping, a rank past its own budget keeps stepping, recording nothing)
            nxt = logits.argmax(-1).masked_fill(done, eos)  # finished rows record EOS (dropped in _finish)
            tokens.append(nxt)
            done = done | (nxt == eos)
        if _all_stop(model, step + 1 >= steps or bool(done.all())):
            break
        feed = nxt.masked_fill(done, pad)[:, None]
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        pos = (pos + 1).clamp_max(top)
        h = model._run_lm(model._embed(feed, None, None), mask, pos, st.cache)
        logits = head(h[:, -1])
        step += 1
    return _finish(tokens, eos)


@torch.no_grad()
def generate_reference(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values=None,
                       position_ids: Optional[torch.Tensor] = None, max_new_tokens: int = 64,
                       dummy_latent: Optional[str] = None) -> list[list[int]]:
    """Uncached reference: every new token recomputes the whole sequence (latents included) with naive_forward.
    Same inputs, stopping and padding rules as `generate`; only for tests (quadratic cost)."""
    last = _last_real(attention_mask)
    B = input_ids.shape[0]
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    rows = torch.arange(B, device=input_ids.device)
    cur = position_ids[rows, last][:, None]
    steps = _budget(model, cur, max_new_tokens)
    eos, pad = model.ids.eos, model.ids.pad
    ids, mask, pos = input_ids, attention_mask, position_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens = []
    for step in range(steps):
        logits = model.naive_forward(ids, mask, pixel_values=pixel_values, position_ids=pos,
                                     dummy_latent=dummy_latent, special_prefix=input_ids.shape[1]).logits
        logits = logits[rows, last] if step == 0 else logits[:, -1]
        nxt = logits.argmax(-1).masked_fill(done, eos)
        tokens.append(nxt)
        done = done | (nxt == eos)
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt.masked_fill(done, pad)[:, None]], 1)
        mask = torch.cat([mask, (~done).long()[:, None]], 1)
        cur = cur + 1
        pos = torch.cat([pos, cur], 1)
    return _finish(tokens, eos)
