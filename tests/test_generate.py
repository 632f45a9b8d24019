"""Cached greedy generation == uncached full-recompute reference (left padding, latents, per-row stopping), for
every backbone family (Llama, Qwen2, Mistral next to GPT-2)."""
import dataclasses

import pytest
import torch

from conftest import FAMILY_VISION

from mmcoconut.data.collate import GenerationCollator
from mmcoconut.modeling import generate_reference


def prompt_rows(model, tok, view, n_latents=2, n_rows=4, seed=0):
    """Prompt rows with different question lengths; n_latents: one count for all rows or a list per row."""
    ids, g = model.ids, torch.Generator().manual_seed(seed)
    q = tok.encode("How many shapes are there? Count the circles and squares in the picture.\n")
    counts = n_latents if isinstance(n_latents, list) else [n_latents] * n_rows
    rows = []
    for i in range(n_rows):
        seq = [ids.image] * model.n_image_tokens + q[: 5 + 3 * i]
        n = counts[i] if view in ("coconut", "dummy") else 0
        if view in ("coconut", "dummy"):
            seq += [ids.start] + [ids.latent] * n + [ids.end]
        rows.append({"input_ids": seq, "n_latents": n, "key": str(i), "meta": {},
                     "pixel_values": torch.randn(3, 32, 32, generator=g)})
    return rows


def prompts(model, tok, view, n_latents=2, n_rows=4, seed=0):
    """GenerationCollator batch of prompt_rows."""
    return GenerationCollator(model.ids, model.ids.pad)(prompt_rows(model, tok, view, n_latents, n_rows, seed))


def run(model, b, fn, **kw):
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"])
    if fn == "ref":
        return generate_reference(model, *args, position_ids=b["position_ids"], **kw)
    return model.generate(*args, position_ids=b["position_ids"], **kw)


GEN_CASES = [("gpt2", "pooled", "coconut"), ("gpt2", "patches", "coconut"), ("gpt2", "pooled", "cot"),
             ("gpt2", "patches", "dummy"), ("llama", "patches", "coconut"), ("qwen2", "pooled", "coconut"),
             ("mistral", "patches", "cot")]


def _ids(cases):
    return [c.id if hasattr(c, "marks") else f"{c[0]}-{FAMILY_VISION[c[0]]}-{c[1]}-{c[2]}" for c in cases]


@pytest.mark.parametrize("arch,mode,view", GEN_CASES, ids=_ids(GEN_CASES))
def test_cached_generation_equals_reference(family_mm, arch, mode, view):
    model, tok = family_mm(arch, mode)
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


def test_generation_rejects_holes_in_a_prompt(tiny_mm):
    model, tok = tiny_mm("pooled")
    b = prompts(model, tok, "nocot", n_rows=2)
    mask = b["attention_mask"].clone()
    mask[1, -3] = 0  # a masked column between real tokens
    with pytest.raises(ValueError, match="contiguous"):
        model.generate(b["input_ids"], mask, b["pixel_values"])
    with pytest.raises(ValueError, match="contiguous"):
        model.generate(b["input_ids"], torch.zeros_like(mask), b["pixel_values"])


ONE_BY_ONE = [("gpt2", "pooled", "coconut"), ("gpt2", "patches", "coconut"), ("gpt2", "patches", "dummy"),
              ("llama", "patches", "coconut"),
              pytest.param("qwen2", "patches", "coconut", marks=pytest.mark.slow, id="qwen2-siglip-patches-coconut"),
              pytest.param("mistral", "patches", "dummy", marks=pytest.mark.slow, id="mistral-siglip-patches-dummy")]


@pytest.mark.parametrize("arch,mode,view", ONE_BY_ONE, ids=_ids(ONE_BY_ONE))
def test_per_sample_latent_counts_equal_one_by_one(family_mm, arch, mode, view):
    """Rows with 0..3 latents in one batch (first latents aligned, rows right-padded after END) generate exactly
    what each row generates alone (no padding at all), and what the uncached reference generates."""
    model, tok = family_mm(arch, mode)
    counts = [3, 0, 1, 2, 3]
    rows = prompt_rows(model, tok, view, n_latents=counts, n_rows=5)
    b = GenerationCollator(model.ids, model.ids.pad)(rows)
    lat = b["input_ids"] == model.ids.latent
    first = [int(r.nonzero()[0]) for r in lat if r.any()]
    assert len(set(first)) == 1  # latents start in one column ...
    assert (b["attention_mask"][:, -1] == 0).any() and (b["attention_mask"][:, 0] == 0).any()  # ... both paddings
    assert b["n_latents"].tolist() == counts
    dummy = "zeros" if view == "dummy" else None
    batched = run(model, b, "gen", max_new_tokens=7, dummy_latent=dummy)
    alone = [run(model, GenerationCollator(model.ids, model.ids.pad)([r]), "gen", max_new_tokens=7,
                 dummy_latent=dummy)[0] for r in rows]
    assert batched == alone
    assert batched == run(model, b, "ref", max_new_tokens=7, dummy_latent=dummy)
    assert all(len(r) == 7 for r in batched) and len({tuple(r) for r in batched}) > 1
