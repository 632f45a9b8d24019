"""Loss only where there are labels (mmcoconut/modeling/loss.py): the label-only, chunked loss equals the [B, T, V]
logits formula (loss within 1e-6 relative, gradients within 1e-5) on the model's parity batches, and training never
makes [B, T, V] logits."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mmcoconut.modeling.loss as loss_mod
from conftest import build_tiny_mmcoconut, make_mm_batch
from mmcoconut.modeling.loss import full_logits_loss, label_positions, labelled_cross_entropy
from mmcoconut.testing import HostSyncCounter, saved_activation_bytes

COUNTS = {"n0": [0, 0, 0], "n2": [2, 2, 2], "n4": [4, 4, 4], "mixed": [0, 2, 4, 1]}


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def models(tiny_dirs):
    cache = {}

    def get(mode):
        if mode not in cache:
            model, tok = build_tiny_mmcoconut(tiny_dirs, mode, seed=3)
            model.train()
            model.lm.eval()  # no dropout: the two formulas must see the same network
            cache[mode] = model, tok
        return cache[mode]
    return get


def _loss_and_grads(model, b, new: bool):
    model.zero_grad(set_to_none=True)
    if new:
        out = model(**b, return_logits=False)
        assert out.logits is None
        loss = out.loss
    else:  # today's formula: full logits, then the loss
        loss = full_logits_loss(model(**dict(b, labels=None)).logits, b["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["pooled", "patches"])
@pytest.mark.parametrize("counts", list(COUNTS), ids=list(COUNTS))
def test_label_only_loss_equals_full_logits_formula(models, mode, counts):
    model, tok = models(mode)
    b = make_mm_batch(model, tok, COUNTS[counts], seed=len(counts))
    assert b["latent_plan"].label_index is not None  # the Collator plans the labelled positions
    old, g_old = _loss_and_grads(model, b, new=False)
    new, g_new = _loss_and_grads(model, b, new=True)
    assert abs(float(new - old)) <= 1e-6 * abs(float(old)), (float(new), float(old))
    assert set(g_new) == set(g_old) and len(g_new) > 10
    for name in g_old:
        assert rel_err(g_new[name], g_old[name]) <= 1e-5, name
    # the default forward (logits for users) gives the same loss and the full logits
    with torch.no_grad():
        out = model(**b)
    assert out.logits.shape == (*b["input_ids"].shape, model.lm.config.vocab_size)
    assert abs(float(out.loss - old)) <= 1e-6 * abs(float(old))


def test_chunks_and_position_sources_give_the_same_loss(models, monkeypatch):
    """Chunks of 5 rows (several chunks, recomputed in backward), positions from the plan, from the labels (no
    plan), or a superset of them: one loss, one gradient."""
    model, tok = models("patches")
    b = make_mm_batch(model, tok, COUNTS["mixed"], seed=7)
    ref, g_ref = _loss_and_grads(model, b, new=True)
    V = model.lm.config.vocab_size
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 5 * 4 * V)
    assert loss_mod.chunk_rows_for(model.lm.get_output_embeddings()) == 5
    assert b["latent_plan"].label_index.numel() > 10  # so there are several chunks
    chunked, g_chunked = _loss_and_grads(model, b, new=True)
    no_plan, _ = _loss_and_grads(model, {k: v for k, v in b.items() if k != "latent_plan"}, new=True)
    for loss, grads in ((chunked, g_chunked), (no_plan, None)):
        assert abs(float(loss - ref)) <= 1e-6 * abs(float(ref))
        for name in grads or {}:
            assert rel_err(grads[name], g_ref[name]) <= 1e-5, name
    hidden = torch.randn(*b["input_ids"].shape, model.lm.config.n_embd)
    head = model.lm.get_output_embeddings()
    pos = label_positions(b["labels"])
    every = torch.arange(b["labels"].numel() - 1)  # a superset: -100 targets are ignored and not counted
    with torch.no_grad():
        exact = labelled_cross_entropy(hidden, b["labels"], head, pos)
        assert abs(float(labelled_cross_entropy(hidden, b["labels"], head, every) - exact)) <= 1e-6 * float(exact)
        with pytest.raises(ValueError, match="label_index does not match labels"):
            labelled_cross_entropy(hidden, b["labels"], head, pos[1:], check=True)


def test_training_forward_makes_no_full_logits(models, monkeypatch):
    """With return_logits=False no tensor of the forward or backward has B*(T-1) or more vocabulary-wide rows;
    the largest is one chunk. No host sync either (positions come from the plan)."""
    model, tok = models("pooled")
    b = make_mm_batch(model, tok, COUNTS["mixed"], seed=2)
    V, D, (B, T) = model.lm.config.vocab_size, model.lm.config.n_embd, b["input_ids"].shape
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 7 * 4 * V)
    seen = []

    class VocabWide(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o.dim() >= 2 and o.shape[-1] == V and o.shape != (D, V):  # not W.t()
                    seen.append(o.numel() // V)
            return out

    model.zero_grad(set_to_none=True)
    with VocabWide(), HostSyncCounter() as syncs:
        model(**b, return_logits=False).loss.backward()
    assert syncs.total == 0, dict(syncs.counts)
    assert seen and max(seen) == 7, seen  # chunks of 7 rows ran (forward and recompute), nothing wider
    with VocabWide():
        seen.clear()
        model(**b).loss.backward()  # users asking for logits get [B, T, V]
    assert max(seen) == B * T


def test_saved_for_backward_drops_the_logits(models):
    model, tok = models("patches")
    b = make_mm_batch(model, tok, COUNTS["n2"], seed=4)
    B, T = b["input_ids"].shape
    V, params = model.lm.config.vocab_size, list(model.parameters())
    _, old = saved_activation_bytes(lambda: full_logits_loss(model(**dict(b, labels=None)).logits, b["labels"]),
                                    exclude=params)
    _, new = saved_activation_bytes(lambda: model(**b, return_logits=False).loss, exclude=params)
    assert old - new >= B * (T - 1) * V * 4, (old, new)  # at least the fp32 log-probabilities of every position


def test_no_labelled_token_gives_a_zero_loss_with_a_graph(models):
    model, tok = models("pooled")
    b = make_mm_batch(model, tok, [1, 2], labels=False)
    assert b["latent_plan"].label_index.numel() == 0
    model.zero_grad(set_to_none=True)
    out = model(**b, return_logits=False)
    out.loss.backward()
    with torch.no_grad():
        assert float(full_logits_loss(model(**b).logits, b["labels"])) == 0.0
    assert float(out.loss.detach()) == 0.0
    assert float(model.lm.get_output_embeddings().weight.grad.abs().sum()) == 0.0


def test_val_padding_rows_carry_no_labels(models):
    """Val-loss batches (EvalLoader with_labels): padding rows (valid=False) get -100 labels before collation, so
    the model's label-only loss, its planned positions and the validation token count all leave them out."""
    from mmcoconut.data.collate import Collator
    from mmcoconut.data.eval_loader import _WithMeta
    model, tok = models("pooled")
    seq = [model.ids.image] + tok.encode("What color?") + tok.encode(" red") + [model.ids.eos]
    row = {"input_ids": seq, "labels": [-100] * 4 + seq[4:], "n_latents": 0, "key": "k",
           "pixel_values": torch.zeros(3, 32, 32), "meta": {}}
    b = _WithMeta(Collator(model.ids, model.ids.pad))([dict(row, valid=True), dict(row, valid=False)])
    assert (b["labels"][1] == -100).all() and (b["labels"][0] != -100).sum() == len(seq) - 4
    assert torch.equal(b["latent_plan"].label_index, label_positions(b["labels"]))
    assert b["latent_plan"].label_index.max() < b["input_ids"].shape[1]  # row 0's positions only
