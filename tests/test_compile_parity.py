"""train.compile's path on CPU (inductor): the model's OWN per-pass LM calls compiled (enable_compile: fullgraph=True,
so a graph break raises) give the eager multi-pass loss and gradients within 1e-5 relative, for 0, 2 and 4 latents
and for mixed per-row counts. The eager reference is a deep copy of the same weights (its default path, deferred
weight gradients included), fed the same batches; dropout off, so neither draws random numbers."""
import copy

import pytest
import torch

from conftest import build_tiny_mmcoconut, make_mm_batch

RTOL = 1e-5  # loss: |compiled - eager| / |eager|; gradients: ||compiled - eager|| / ||eager|| per parameter
B = 4  # one batch size for every case: the compiled graphs are shared (shapes differ only in the pass widths)


@pytest.fixture(scope="module")
def eager_and_compiled(tiny_dirs):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager, tok = build_tiny_mmcoconut(tiny_dirs, "pooled", seed=3)
    eager.train()
    eager.lm.eval()  # no dropout
    compiled = copy.deepcopy(eager)
    compiled.enable_compile(backend="inductor")
    yield eager, compiled, tok
    torch._dynamo.reset()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach().double(), grads, out.n_passes


def _assert_compiled_matches_eager(eager, compiled, tok, latents, seed):
    from torch._dynamo.utils import counters
    batch = make_mm_batch(eager, tok, latents, seed=seed)
    loss, grads, n_passes = _loss_and_grads(eager, batch)
    c_loss, c_grads, c_passes = _loss_and_grads(compiled, batch)
    # the compiled calls ran (not eager): the multi-column one and, with latents, the one-column one
    assert counters["stats"]["unique_graphs"] >= (2 if max(latents) > 1 else 1), dict(counters["stats"])
    assert n_passes == c_passes == max(latents) + 1, latents
    assert abs(c_loss - loss) <= RTOL * abs(loss), (latents, loss.item(), c_loss.item())
    assert c_grads.keys() == grads.keys() and len(grads) > 10
    worst = max(((c_grads[k] - g).norm() / g.norm().clamp_min(1e-30)).item() for k, g in grads.items())
    assert worst <= RTOL, (latents, worst)


def test_compiled_latent_passes_match_eager_mixed_rows(eager_and_compiled):
    """Rows with 0/2/4/1 latents in one batch: pass 0, one-column passes in which some rows keep their token
    embedding (no latent left), and the last pass."""
    eager, compiled, tok = eager_and_compiled
    _assert_compiled_matches_eager(eager, compiled, tok, [0, 2, 4, 1], seed=0)


@pytest.mark.parametrize("n", [2, 4, pytest.param(0, marks=pytest.mark.slow)])
def test_compiled_latent_passes_match_eager(eager_and_compiled, n):
    """Every row with n latents: n = 2, 4 reuse the graphs the mixed batch compiled (seconds); n = 0 is one pass
    over the whole sequence, a recompile (~35 s warm, minutes with a cold inductor cache): slow."""
    eager, compiled, tok = eager_and_compiled
    _assert_compiled_matches_eager(eager, compiled, tok, [n] * B, seed=n + 1)
