"""2 CPU ranks (gloo) with different latent counts: the pass count the engine agrees on is all-reduced, losses equal
1-process ones."""
import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = str(Path(__file__).resolve().parent)
BATCHES = {0: [0, 2, 3], 1: [0, 0]}  # rank 1 has no latents at all: its sequence is split anyway



def _worker(rank, port, dirs, queue):
    try:
        sys.path.insert(0, TESTS)
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2,
                                             timeout=__import__("datetime").timedelta(seconds=60))
        from conftest import build_tiny_mmcoconut, make_mm_batch
        from mmcoconut.train.engines import rank_agreement
        model, tok = build_tiny_mmcoconut(dirs, "pooled")
        rank_agreement.install(model, stop_together=False)  # what the engine installs on a multi-rank run
        b = make_mm_batch(model, tok, BATCHES[rank], seed=rank)
        out = model(**b)
        out.loss.backward()
        queue.put((rank, out.n_passes, float(out.loss), float(model.lm.transformer.wte.weight.grad.norm())))
        torch.distributed.destroy_process_group()
    except BaseException as e:  # report instead of hanging the parent
        queue.put((rank, "error", repr(e), None))


def test_two_ranks_same_pass_count(tiny_dirs):
    from conftest import build_tiny_mmcoconut, make_mm_batch, run_spawned_ranks
    results = run_spawned_ranks(_worker, 2, (dict(tiny_dirs),))
    assert all(r[0] != "error" for r in results.values()), results
    model, tok = build_tiny_mmcoconut(tiny_dirs, "pooled")
    for rank, (n_passes, loss, gnorm) in results.items():
        assert n_passes == max(BATCHES[0]) + 1  # both ranks: 4 LM calls
        model.zero_grad(set_to_none=True)
        out = model(**make_mm_batch(model, tok, BATCHES[rank], seed=rank))
        out.loss.backward()
        assert out.n_passes == max(BATCHES[rank]) + 1
        assert loss == pytest.approx(out.loss.item(), rel=1e-5)
        assert gnorm == pytest.approx(float(model.lm.transformer.wte.weight.grad.norm()), rel=1e-5)
