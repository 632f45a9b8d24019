"""MMCoconut: KV-cached multi-pass forward == naive recompute == an independent per-row computation; grads.
Parametrised by backbone family (conftest.MODEL_CASES: GPT-2 in both image-token modes, Llama, Qwen2 and Mistral)."""
import pytest
import torch

from conftest import CASE_IDS, FAMILIES, MODEL_CASES, WTE_SCALE, build_tiny_mmcoconut, make_mm_batch


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("arch,mode", MODEL_CASES, ids=CASE_IDS)
def test_cached_equals_naive(family_mm, arch, mode):
    model, tok = family_mm(arch, mode)
    b = make_mm_batch(model, tok, [0, 2, 3, 1])
    assert (b["attention_mask"][:, 0] == 0).any() and (b["attention_mask"][:, -1] == 0).any()  # left + right pad
    with torch.no_grad():
        out, ref = model(**b), model.naive_forward(**b)
        dz, dz_ref = model(**b, dummy_latent="zeros"), model.naive_forward(**b, dummy_latent="zeros")
    assert out.n_passes == ref.n_passes == 4
    assert rel_err(out.logits, ref.logits) <= 1e-5 and abs(out.loss - ref.loss) <= 1e-5 * abs(ref.loss)
    assert rel_err(dz.logits, dz_ref.logits) <= 1e-5
    # the latents matter: zero latent inputs change the answer logits
    assert rel_err(dz.logits, out.logits) > 1e-3


COUNTS = {"n0": [0, 0, 0], "n1": [1, 1, 1], "n2": [2, 2, 2], "n4": [4, 4, 4], "mixed": [4, 0, 2, 1]}


@pytest.mark.parametrize("arch,counts", [
    pytest.param(a, c, id=f"{k}-{a}", marks=() if a == "llama" or k == "mixed" else pytest.mark.slow)
    for a in FAMILIES for k, c in COUNTS.items()])
def test_latent_counts_cached_equals_naive(family_mm, arch, counts):
    """n in {0, 1, 2, 4} latents in every row, and mixed per row: the cached forward equals the recompute (every count
    for Llama and mixed counts for every family in the default suite; the other counts per family are `slow`)."""
    model, tok = family_mm(arch)
    b = make_mm_batch(model, tok, counts, seed=7)
    with torch.no_grad():
        out, ref = model(**b), model.naive_forward(**b)
    assert out.n_passes == ref.n_passes == max(counts) + 1
    assert rel_err(out.logits, ref.logits) <= 1e-5 and abs(out.loss - ref.loss) <= 1e-5 * abs(ref.loss)


def per_row_reference(model, b, r):
    """Row r alone, unpadded, plain HF calls: latent j's input = last hidden state of the column before it (as
    upstream Coconut: `hidden_states[-1]`, after the final norm, of the LM's base model)."""
    keep = b["attention_mask"][r].bool()
    ids = b["input_ids"][r][keep]
    lm, wte = model.lm, model.lm.get_input_embeddings().weight
    emb = wte[ids].clone()
    img = (ids == model.ids.image).nonzero().flatten()
    emb[img] = model.image_features(b["pixel_values"][r:r + 1])[0]
    for c in (ids == model.ids.latent).nonzero().flatten().tolist():
        h = lm(inputs_embeds=emb[None, :c], output_hidden_states=True).hidden_states[-1]
        emb = torch.cat([emb[:c], h[0, -1:], emb[c + 1:]])
    return lm(inputs_embeds=emb[None]).logits[0], keep


@pytest.mark.parametrize("arch,mode", MODEL_CASES, ids=CASE_IDS)
def test_matches_independent_per_row(family_mm, arch, mode):
    model, tok = family_mm(arch, mode)
    b = make_mm_batch(model, tok, [3, 0, 2], seed=1)
    with torch.no_grad():
        out = model(**b)
        for r in range(3):
            ref, keep = per_row_reference(model, b, r)
            assert rel_err(out.logits[r][keep], ref) <= 1e-5, r


@pytest.mark.parametrize("arch", FAMILIES)
def test_zero_latents_equals_plain_lm(family_mm, arch):
    model, tok = family_mm(arch, "patches")
    b = make_mm_batch(model, tok, [0, 0, 0])
    with torch.no_grad():
        out = model(**b)
        emb = model.lm.get_input_embeddings().weight[b["input_ids"]].clone()
        is_img = b["input_ids"] == model.ids.image
        emb[is_img] = model.image_features(b["pixel_values"]).flatten(0, 1)
        plain = model.lm(inputs_embeds=emb, attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                         labels=b["labels"])
    assert out.n_passes == 1
    assert abs(out.loss - plain.loss) <= 1e-5 * abs(plain.loss)
    assert rel_err(out.logits, plain.logits) <= 1e-5


@pytest.mark.parametrize("arch,mode", MODEL_CASES, ids=CASE_IDS)
def test_gradients_match_naive(family_dirs, arch, mode):
    model, tok = build_tiny_mmcoconut(family_dirs(arch), mode, seed=3)
    model.train()
    model.lm.eval()  # no dropout: both forwards must see the same network
    b = make_mm_batch(model, tok, [2, 0, 3], seed=2)
    proj = model._wgrad_modules  # layer 0's first attention projection ... the last layer's MLP output
    params = {"wte": model.lm.get_input_embeddings().weight, "c_attn": proj[0].weight, "mlp": proj[-1].weight,
              "proj": model.projector[0].weight}
    head = model.lm.get_output_embeddings().weight
    if head is not params["wte"]:  # an untied output head (Mistral)
        params["head"] = head
    grads = []
    for fwd in (model.forward, model.naive_forward):
        model.zero_grad(set_to_none=True)
        fwd(**b).loss.backward()
        grads.append({k: p.grad.clone() for k, p in params.items()})
    for k in params:
        assert grads[0][k].abs().max() > 0, k
        assert rel_err(grads[0][k], grads[1][k]) <= 1e-5, k
    # the latent chain carries gradient: detaching the fills changes the grads
    orig = model._fill
    model._fill = lambda h, d: orig(h, d).detach()
    try:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        assert rel_err(params["c_attn"].grad, grads[0]["c_attn"]) > 1e-4
    finally:
        del model._fill
    assert all(not p.requires_grad for p in model.vision.parameters()) and not model.vision.training


def test_more_passes_than_local_latents(tiny_mm, monkeypatch):
    """As on a rank whose batch has fewer latents than another rank's: extra passes, same result."""
    model, tok = tiny_mm("pooled")
    for counts in ([0, 2, 1], [0, 0, 0]):
        b = make_mm_batch(model, tok, counts)
        with torch.no_grad():
            ref = model(**b)
            model.agree_pass_count = lambda v: b["input_ids"].shape[1] + 2
            try:
                out = model(**b)
            finally:
                model.agree_pass_count = None
        assert out.n_passes == b["input_ids"].shape[1] + 3  # forces right padding too
        assert rel_err(out.logits, ref.logits) <= 1e-5 and abs(out.loss - ref.loss) <= 1e-5 * ref.loss


def test_batch_errors(tiny_mm, monkeypatch):
    import mmcoconut.modeling.latent as latent
    model, tok = tiny_mm("patches")
    b = make_mm_batch(model, tok, [2, 1])
    b.pop("latent_plan")  # the model plans these edited batches itself
    bad = dict(b, input_ids=b["input_ids"].clone())
    bad["input_ids"][0, (bad["input_ids"][0] == model.ids.image).nonzero()[0, 0]] = model.ids.pad
    with pytest.raises(ValueError, match="<image> tokens"):
        model(**bad)
    bad = dict(b, input_ids=b["input_ids"].clone())
    row = bad["input_ids"][1]
    c = (row == model.ids.latent).nonzero()[0, 0]
    row[c], row[c + 1] = row[c + 1].clone(), row[c].clone()  # latent after END: misaligned
    with pytest.raises(ValueError, match="not aligned"):
        model(**bad)
    with pytest.raises(ValueError, match="dummy_latent"):
        model(**b, dummy_latent="ones")
    # a plan left over from another batch is caught in debug mode
    other = make_mm_batch(model, tok, [3, 0])
    monkeypatch.setattr(latent, "DEBUG", True)
    with pytest.raises(ValueError, match="latent_plan does not match"):
        model(**dict(b, latent_plan=other["latent_plan"]))


def test_collator_rejects_bad_rows_naming_keys(tiny_mm):
    from mmcoconut.data.collate import Collator
    model, tok = tiny_mm("patches")
    ids = model.ids
    q = tok.encode("What color is the cube?\n")
    row = lambda key, seq: {"input_ids": seq, "labels": [-100] * len(seq), "n_latents": seq.count(ids.latent),  # noqa
                            "key": key, "pixel_values": torch.zeros(3, 32, 32)}
    img = [ids.image] * model.n_image_tokens
    good = img + q + [ids.start, ids.latent, ids.latent, ids.end, ids.eos]
    split = img + q + [ids.start, ids.latent, ids.end, ids.latent, ids.eos]  # latents not contiguous
    with pytest.raises(ValueError, match="not aligned.*'q-split'"):
        Collator(ids, ids.pad)([row("q-good", good), row("q-split", split)])
    with pytest.raises(ValueError, match="<image> tokens.*'q-noimg'"):
        Collator(ids, ids.pad)([row("q-good", good), row("q-noimg", q + [ids.eos])])
    plan = Collator(ids, ids.pad)([row("q-good", good), row("q-other", good[:-1] + [ids.eos])])["latent_plan"]
    assert (plan.m_local, plan.image_counts) == (2, (model.n_image_tokens,) * 2)
    assert plan.layout(3).bounds == ((0, plan.first_latent), (plan.first_latent, plan.first_latent + 1),
                                     (plan.first_latent + 1, plan.first_latent + 2), (plan.first_latent + 2, plan.T))


def test_build_options(tiny_dirs, tmp_path):
    from transformers import GPT2LMHeadModel

    from mmcoconut.modeling.vision import num_image_tokens
    model, tok = build_tiny_mmcoconut(tiny_dirs, "patches", projector="linear", freeze_vision=False)
    assert isinstance(model.projector, torch.nn.Linear)
    assert model.n_image_tokens == num_image_tokens(model.vision.config, "patches") == 4
    model.train()
    assert model.vision.training and all(p.requires_grad for p in model.vision.parameters())
    model, _ = build_tiny_mmcoconut(tiny_dirs, "pooled")
    model.train()
    assert model.n_image_tokens == 1 and not model.vision.training and model.lm.training
    # resizing: a checkpoint without the special-token rows gets them from new_token_init (or the mean)
    lm = GPT2LMHeadModel.from_pretrained(tiny_dirs["lm"])
    old = len(tok) - 5
    lm.resize_token_embeddings(old)
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    w0 = lm.transformer.wte.weight.detach()
    init = next(t for t in ("red", " red", "The") if len(tok.encode(t)) == 1)
    for token, expect in ((init, w0[tok.encode(init)[0]]), ("", w0.mean(0))):
        dirs = dict(tiny_dirs, lm=str(tmp_path / "lm"))
        m, t2 = build_tiny_mmcoconut(dirs, "pooled", new_token_init=token)
        w = m.lm.transformer.wte.weight.detach() / WTE_SCALE  # undo build_tiny_mmcoconut's scaling
        assert w.shape[0] == len(t2) and torch.allclose(w[old:], expect.expand(5, -1), atol=1e-6)
        assert m.lm.lm_head.weight.data_ptr() == m.lm.transformer.wte.weight.data_ptr()


def test_latent_scale_embedding(tiny_mm):
    """model.latent_scale=embedding: every fed-back hidden state is rescaled to the mean wte row norm, in the
    cached forward and the naive reference alike (equal), against a per-row reference with the scaled fill; zeros
    stay zeros; 'none' is the unscaled forward."""
    model, tok = tiny_mm("pooled")
    b = make_mm_batch(model, tok, [0, 2, 3, 1])
    with torch.no_grad():
        plain = model(**b).logits
        model.latent_scale = "embedding"
        try:
            out, ref = model(**b), model.naive_forward(**b)
            dz = model(**b, dummy_latent="zeros").logits
            h = torch.randn(3, model.lm.config.n_embd) * 7
            fill = model._fill(h, None)
            target = model.lm.transformer.wte.weight.norm(dim=-1).mean()
            assert torch.allclose(fill.norm(dim=-1), target.expand(3), rtol=1e-5)
            assert torch.allclose(torch.nn.functional.cosine_similarity(fill, h, dim=-1), torch.ones(3), atol=1e-5)
            assert not model._fill(h, "zeros").any()
        finally:
            model.latent_scale = "none"
        dz_plain = model(**b, dummy_latent="zeros").logits
    assert rel_err(out.logits, ref.logits) <= 1e-5
    assert rel_err(out.logits, plain) > 1e-3  # the scale changes what the latents feed
    assert torch.equal(dz, dz_plain)  # zero latents are unaffected
    with pytest.raises(ValueError, match="latent_scale"):
        type(model)(model.lm, model.vision, model.projector, model.ids, model.n_image_tokens, latent_scale="x")
