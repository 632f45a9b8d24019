"""Cached greedy generation == uncached full-recompute reference (left padding, latents, per-row stopping)."""
import dataclasses

import pytest
import torch

from mmcoconut.data.collate import GenerationCollator
from mmcoconut.model import generate_reference


def prompts(model, tok, view, n_latents=2, n_rows=4, seed=0):
    """GenerationCollator batch of prompts with different question lengths (left padding)."""
    ids, g = model.ids, torch.Generator().manual_seed(seed)
    q = tok.encode("How many shapes are there? Count the circles and squares in the picture.\n")
    rows = []
    for i in range(n_rows):
        seq = [ids.image] * model.n_image_tokens + q[: 5 + 3 * i]
        if view in ("coconut", "dummy"):
            seq += [ids.start] + [ids.latent] * n_latents + [ids.end]
        rows.append({"input_ids": seq, "n_latents": n_latents if view in ("coconut", "dummy") else 0,
                     "key": str(i), "meta": {}, "pixel_values": torch.randn(3, 32, 32, generator=g)})
    return GenerationCollator(ids, ids.pad)(rows)


def run(model, b, fn, **kw):
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"])
    if fn == "ref":
        return generate_reference(model, *args, position_ids=b["position_ids"], **kw)
    return model.generate(*args, position_ids=b["position_ids"], **kw)


@pytest.mark.parametrize("mode,view", [("pooled", "coconut"), ("patches", "coconut"), ("pooled", "cot"),
                                       ("patches", "dummy")])
def test_cached_generation_equals_reference(tiny_mm, mode, view):
    model, tok = tiny_mm(mode)
    b = prompts(model, tok, view)
    assert (b["attention_mask"] == 0).any()
    dummy = "zeros" if view == "dummy" else None
    free = run(model, b, "gen", max_new_tokens=8, dummy_latent=dummy)
    assert free == run(model, b, "ref", max_new_tokens=8, dummy_latent=dummy)
    assert all(len(r) == 8 for r in free)  # the random tiny LM never says EOS by itself
    # Per-row stopping: declare EOS a token that rows reach at different steps (some never).
    first = {t: [r.index(t) if t in r else None for r in free] for t in sum(free, [])}
    stop = next(t for t, f in first.items() if None in f and len({x for x in f if x is not None} - {0}) >= 1)
    model.ids = dataclasses.replace(model.ids, eos=stop)
    try:
        got = run(model, b, "gen", max_new_tokens=8, dummy_latent=dummy)
        assert got == run(model, b, "ref", max_new_tokens=8, dummy_latent=dummy)
    finally:
        model.ids = dataclasses.replace(model.ids, eos=tok.eos_token_id)
    expect = [r[:r.index(stop)] if stop in r else r for r in free]
    assert got == expect and stop not in sum(got, []) and len({len(r) for r in got}) >= 2


def test_generation_views_differ_and_stop(tiny_mm):
    model, tok = tiny_mm("pooled")
    b = prompts(model, tok, "coconut", n_latents=3, n_rows=3)
    coconut = run(model, b, "gen", max_new_tokens=6)
    zeros = run(model, b, "gen", max_new_tokens=6, dummy_latent="zeros")
    torch.manual_seed(0)
    rand = run(model, b, "gen", max_new_tokens=6, dummy_latent="random")
    assert len(coconut) == len(zeros) == len(rand) == 3 and coconut != zeros
    assert run(model, b, "gen", max_new_tokens=0) == [[], [], []]
    # positions never pass n_positions: the budget is capped
    assert all(len(r) <= model.lm.config.n_positions for r in run(model, b, "gen", max_new_tokens=10_000)[:1])


def test_generation_rejects_right_padding(tiny_mm):
    model, tok = tiny_mm("pooled")
    b = prompts(model, tok, "nocot", n_rows=2)
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(b["input_ids"].flip(1), b["attention_mask"].flip(1), b["pixel_values"])
