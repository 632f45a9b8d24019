"""FSDP2 engine on 2 CPU ranks (gloo): the sharded model computes what the unsharded one does.

fully_shard wraps every decoder block, vision layer, the projector and the root. The fused injection reads the
embedding table outside the table's own module: inside the root's forward the root's parameters are unsharded, so
the table it gets must be the whole [V, D] tensor, in training and in generation (inside engine.generating()).
Losses, gradients (reduced over the ranks), greedy generations and the gathered fp32 state dict must equal the
unsharded model's.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = str(Path(__file__).resolve().parent)
LATENTS = {0: [2, 1], 1: [0, 3]}  # per rank: the pass count is agreed (4 LM calls on both)
pytestmark = pytest.mark.multiproc



def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _worker(rank, port, dirs, queue):
    try:
        sys.path.insert(0, TESTS)
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                          LOCAL_RANK=str(rank))
        from conftest import build_tiny_mmcoconut, make_mm_batch

        import mmcoconut.modeling.latent as latent
        from mmcoconut.config import load_config
        from mmcoconut.train.engines import create_engine, init_distributed
        from mmcoconut.train.engines.fsdp_config import fsdp_spec
        from mmcoconut.train.schedule import make_scheduler_factory

        cfg = load_config(data={"train": {"engine": "fsdp2", "micro_batch_size": 2}})
        spec = fsdp_spec(cfg, 2)
        init_distributed(spec)
        engine = create_engine(spec, cfg)
        model, tok = build_tiny_mmcoconut(dirs, "patches")
        _no_dropout(model)
        batch = make_mm_batch(model, tok, LATENTS[rank], seed=rank)
        seen = []  # the embedding table the injection reads: type and shape
        inject = latent.inject_embeddings

        def spy(input_ids, weight, sources, source_index):
            seen.append((type(weight).__name__, tuple(weight.shape)))
            return inject(input_ids, weight, sources, source_index)

        latent.inject_embeddings = spy
        engine.wrap(model, make_scheduler_factory(cfg.train, 10))
        engine.train()
        out = engine.forward(batch)
        out.loss.backward()  # gradient sync on: reduce-scattered (mean over the ranks)
        grads = {n: p.grad.full_tensor().numpy() for n, p in model.named_parameters() if p.grad is not None}
        training_reads = list(seen)
        engine.eval()
        with engine.generating(), torch.no_grad():
            gen = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                 max_new_tokens=4)
        full = engine.full_state_dict()
        full = None if full is None else {k: v.numpy() for k, v in full.items()}  # plain pickles through the queue
        queue.put((rank, dict(loss=out.loss.item(), n_passes=out.n_passes, grads=grads, gen=gen,
                              reads=training_reads, gen_reads=seen[len(training_reads):], full=full)))
        torch.distributed.destroy_process_group()
    except BaseException as e:  # report instead of hanging the parent
        import traceback
        queue.put((rank, {"error": traceback.format_exc()[-3000:] + repr(e)}))


def test_fsdp2_sharded_model_computes_what_the_unsharded_one_does(tiny_dirs):
    from conftest import build_tiny_mmcoconut, make_mm_batch, run_spawned_ranks
    results = run_spawned_ranks(_worker, 2, (dict(tiny_dirs),))
    assert all("error" not in r for r in results.values()), results
    model, tok = build_tiny_mmcoconut(tiny_dirs, "patches")
    _no_dropout(model)
    model.train()
    model.agree_pass_count = lambda n: 3  # what the two ranks agreed on: max latents 3 -> 4 LM calls
    V, D = model.lm.transformer.wte.weight.shape
    for rank in (0, 1):
        out = model(**make_mm_batch(model, tok, LATENTS[rank], seed=rank))
        (out.loss / 2).backward()  # the reduce-scatter averages over the 2 ranks
        r = results[rank]
        assert r["n_passes"] == out.n_passes == 4 and r["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
        # the injection saw the whole table (the unsharded parameter, not a DTensor shard), in training and generation
        assert r["reads"] and set(r["reads"]) == {("Parameter", (V, D))}, r["reads"]
        assert r["gen_reads"] and set(r["gen_reads"]) == {("Parameter", (V, D))}, r["gen_reads"]
    model.eval()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in (0, 1):
        r = results[rank]
        assert set(r["grads"]) == set(grads)
        for n, g in grads.items():
            torch.testing.assert_close(torch.from_numpy(r["grads"][n]), g, rtol=1e-4, atol=1e-6, msg=n)
        with torch.no_grad():
            b = make_mm_batch(model, tok, LATENTS[rank], seed=rank)
            model.agree_pass_count = None
            assert r["gen"] == model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"],
                                              max_new_tokens=4)
    full, ref = results[0]["full"], model.state_dict()
    assert results[1]["full"] is None and set(full) == set(ref)
    for k, v in ref.items():
        assert torch.equal(torch.from_numpy(full[k]), v.float() if v.is_floating_point() else v), k
