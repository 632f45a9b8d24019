"""The GPU-ready hot path, proven on CPU for every backbone family: no host syncs, one embedding gradient, no K/V
copies (grouped-query attention: K/V stored with the K/V heads), compile-ready, deferred weight gradients, gradient
checkpointing."""
import pytest
import torch

from conftest import build_tiny_mmcoconut, families, make_mm_batch
from mmcoconut.testing import HostSyncCounter, VDGradCounter, saved_activation_bytes


@pytest.fixture(scope="module", params=families("qwen2"))  # qwen2: what llama and mistral prove (GQA, Linear)
def trained_mode(request, family_dirs):
    model, tok = build_tiny_mmcoconut(family_dirs(request.param), "patches", seed=3)
    model.train()
    model.lm.eval()  # no dropout: runs must be comparable
    return model, tok


def test_forward_backward_without_host_syncs(trained_mode):
    model, tok = trained_mode
    b = make_mm_batch(model, tok, [2, 0, 3, 1], seed=2)
    model.zero_grad(set_to_none=True)
    with HostSyncCounter() as c:
        out = model(**b)
        out.loss.backward()
    assert c.total == 0, dict(c.counts)
    assert out.n_passes == 4 and model.lm.get_input_embeddings().weight.grad.abs().sum() > 0
    # the probe sees reads: without a plan the model plans from a host copy, and the counter says so
    b.pop("latent_plan")
    with HostSyncCounter() as c, torch.no_grad():
        model(**b)
    assert c.total > 0


@pytest.mark.parametrize("latents", [[1, 0, 1], [3, 2, 3]])
def test_one_embedding_gradient_per_microbatch(trained_mode, latents):
    model, tok = trained_mode
    b = make_mm_batch(model, tok, latents, seed=1)
    wte = model.lm.get_input_embeddings().weight
    tied = model.lm.get_output_embeddings().weight is wte
    model.zero_grad(set_to_none=True)
    loss = model(**b).loss
    with VDGradCounter(wte.shape) as vd:
        loss.backward()
    # one table gradient from the embedding op, one from the lm_head (mm); tied: one add accumulating them
    assert vd.counts["inject_embeddings_backward"] == 1, dict(vd.counts)
    assert vd.counts["mm"] == 1 and vd.counts["add"] <= (1 if tied else 0), dict(vd.counts)
    assert not {"zeros", "embedding_dense_backward", "index_add"} & set(vd.counts), dict(vd.counts)


def test_static_cache_saves_no_kv_copies(trained_mode):
    """Bytes saved for backward: the latent forward keeps about what one plain forward over the same tokens keeps
    (a growing DynamicCache kept a K/V copy per pass: +60 % here with 6 latents, when the loss still kept [B, T, V]
    log-probabilities in both; since the loss keeps labelled rows only (loss.py) the per-pass masks and states are
    a larger share of a smaller total: +16 %)."""
    model, tok = trained_mode
    b = make_mm_batch(model, tok, [6, 6, 6], seed=4)
    plain = dict(b, input_ids=b["input_ids"].masked_fill(b["input_ids"] == model.ids.latent, model.ids.end))
    plain.pop("latent_plan")
    params = list(model.parameters())
    out, latent_bytes = saved_activation_bytes(lambda: model(**b), exclude=params)
    assert out.n_passes == 7
    _, plain_bytes = saved_activation_bytes(lambda: model(**plain), exclude=params)
    assert latent_bytes <= 1.2 * plain_bytes, (latent_bytes, plain_bytes)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_latent_passes_compile_fullgraph(family_dirs, arch):
    """The model's own per-pass LM calls (enable_compile: fullgraph=True, so a graph break raises) traced with
    aot_eager (no codegen): a batch with pass 0, one-column latent passes and the last pass gives the eager loss
    and gradients (Llama: rotary positions, grouped-query attention). The fused embedding op compiles fullgraph
    too."""
    model, tok = build_tiny_mmcoconut(family_dirs(arch), "patches", seed=5)
    model.train()
    model.lm.eval()  # no dropout: eager and compiled draw no random numbers
    b = make_mm_batch(model, tok, [3, 0, 1], seed=1)
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model.enable_compile(backend="aot_eager") if compiled else model.disable_compile()
        model.zero_grad(set_to_none=True)
        try:
            out = model(**b)
            out.loss.backward()
        finally:
            model.disable_compile()
        runs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None}))
    assert out.n_passes == 4
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-5, atol=0)
    assert runs[1][1].keys() == runs[0][1].keys()
    for name, g in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], g, rtol=1e-5, atol=1e-6, msg=name)

    from mmcoconut.kernels import inject_embeddings
    from mmcoconut.kernels.testing import make_case
    case = make_case(B=2, T=6, V=9, D=4, N=3, injected=0.4, seed=1)
    w = case.weight.clone().requires_grad_(True)
    compiled = torch.compile(inject_embeddings, fullgraph=True, backend="aot_eager")
    (gw,) = torch.autograd.grad(compiled(case.input_ids, w, case.sources, case.source_index), w, case.grad_out)
    (ref,) = torch.autograd.grad(inject_embeddings(case.input_ids, w, case.sources, case.source_index), w,
                                 case.grad_out)
    torch.testing.assert_close(gw, ref)


def test_deferred_weight_gradients(trained_mode, monkeypatch):
    """Each projection weight (GPT-2's Conv1D, the nn.Linear of the others) gets one gradient per micro-batch,
    accumulated in place over the passes (wgrad.py): same loss bit for bit, same gradients up to the rounding of a
    fused multiply-add, one AccumulateGrad per weight."""
    import mmcoconut.modeling.wgrad as wgrad
    model, tok = trained_mode
    b = make_mm_batch(model, tok, [2, 0, 3, 1], seed=5)
    weights = [m.weight for m in model._wgrad_modules]
    per_layer = 4 if model.family == "gpt2" else 7  # c_attn c_proj c_fc c_proj | q k v o gate up down
    assert len(weights) == per_layer * model.lm.config.num_hidden_layers
    fired = {}
    handles = [w.register_post_accumulate_grad_hook(lambda p: fired.__setitem__(id(p), fired.get(id(p), 0) + 1))
               for w in weights]
    calls, adds = [], []
    orig, orig_add = wgrad._Buffers.accumulate, wgrad._Buffers._add
    monkeypatch.setattr(wgrad._Buffers, "accumulate", lambda self, *a: (calls.append(1), orig(self, *a))[1])
    monkeypatch.setattr(wgrad._Buffers, "_add", lambda self, *a: (adds.append(1), orig_add(self, *a))[1])
    runs = {}
    try:
        for deferred in (False, True):
            model.deferred_wgrad = deferred
            model.zero_grad(set_to_none=True)
            fired.clear()
            out = model(**b)
            out.loss.backward()
            runs[deferred] = (out.loss.detach(), [p.grad.clone() for p in model.lm.parameters()])
            assert sorted(fired.values()) == [1] * len(weights), deferred
            assert all("forward" not in vars(m) for m in model._wgrad_modules)  # the context restored them
    finally:
        model.deferred_wgrad = True
        for h in handles:
            h.remove()
    assert len(calls) == out.n_passes * len(weights)  # every pass of every layer went through the buffers
    assert len(weights) < len(adds) < len(calls)  # wide calls multiplied in directly, narrow ones stashed
    assert torch.equal(runs[True][0], runs[False][0])
    for g_def, g_ref in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(g_def, g_ref, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no backward coming: plain Conv1D calls
        calls.clear()
        model(**b)
    assert not calls
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision (HF Trainer): plain calls, autograd casts
        out = model(**b)
    out.loss.backward()
    assert not calls and all(p.grad.dtype == p.dtype for p in model.lm.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", families("qwen2", "mistral"))
def test_gradient_checkpointing_equals_plain(family_dirs, arch):
    """train.gradient_checkpointing: every decoder-layer call of every pass is recomputed in backward (non-reentrant,
    reading the K/V history its first run read); the loss and every gradient equal the plain multi-pass forward's
    (dropout on for GPT-2's test preset: the recompute replays the RNG), and fewer activation bytes are kept. HF's
    reentrant checkpointing (which would drop the history's gradients) is refused."""
    model, tok = build_tiny_mmcoconut(family_dirs(arch), "patches", seed=3)
    model.train()  # the layers checkpoint only in training mode
    model.deferred_wgrad = False  # the reference: plain autograd (deferred wgrad is off under checkpointing anyway)
    b = make_mm_batch(model, tok, [2, 0, 3, 1], seed=5)
    params = [p for p in model.parameters() if p.requires_grad]
    runs = {}
    for ckpt in (False, True):
        model.set_gradient_checkpointing(ckpt)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out, kept = saved_activation_bytes(lambda: model(**b), exclude=params)
        out.loss.backward()
        runs[ckpt] = (out.loss.detach(), [p.grad.clone() for p in params], kept)
    model.set_gradient_checkpointing(False)
    assert out.n_passes == 4 and model.gradient_checkpointing is False
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-6, atol=0)
    for g_ckpt, g_ref in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(g_ckpt, g_ref, rtol=1e-5, atol=1e-7)
    assert runs[True][2] < 0.8 * runs[False][2], (runs[True][2], runs[False][2])
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from mmcoconut.modeling.families import decoder_layers
    for layer in decoder_layers(model.lm):  # what HF's gradient_checkpointing_enable() sets by default
        layer.gradient_checkpointing, layer._gradient_checkpointing_func = True, partial(checkpoint, use_reentrant=True)
    try:
        with pytest.raises(ValueError, match="reentrant"):
            model(**b)
    finally:
        model.set_gradient_checkpointing(False)
