"""Fused embedding injection on CUDA: extension vs reference (skipped without a GPU)."""

import pytest
import torch

import mmcoconut.kernels as K
from mmcoconut.kernels import inject_embeddings, inject_embeddings_reference
from mmcoconut.kernels.testing import CASES as BASE_CASES
from mmcoconut.kernels.testing import DTYPES, assert_matches_reference, make_case, run_op

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = {
    **BASE_CASES,
    "gpt2_D768": dict(B=4, T=128, V=1000, D=768, N=200, injected=0.3),  # 16-byte units
    "gpt2xl_D1600": dict(B=2, T=64, V=500, D=1600, N=64, injected=0.3),
    "repeated_ids": dict(B=8, T=256, V=3, D=24, N=8, injected=0.1),  # > 32 rows per id: chunked reduction
}


@pytest.fixture
def use_ext(monkeypatch):
    monkeypatch.setenv("MMCOCONUT_INJECT", "ext")
    monkeypatch.delenv("MMCOCONUT_DETERMINISTIC", raising=False)
    assert K.backend_for("cuda") == "ext"


@pytest.mark.parametrize("deterministic", ["0", "1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(CASES))
def test_ext_matches_reference(use_ext, monkeypatch, name, dtype, deterministic):
    monkeypatch.setenv("MMCOCONUT_DETERMINISTIC", deterministic)
    case = make_case(**CASES[name], dtype=dtype, device="cuda", seed=hash(name) % 1000)
    assert_matches_reference(inject_embeddings, inject_embeddings_reference, case)


def test_misaligned_and_non_contiguous(use_ext):
    case = make_case(B=3, T=20, V=30, D=40, N=12, injected=0.3, dtype=torch.float16, device="cuda", seed=1)
    flat = torch.randn(12 * 40 + 1, device="cuda", dtype=torch.float16)
    sources = flat[1:].view(12, 40)  # contiguous, data pointer 2 bytes off: forces 2-byte copies
    ids, index = case.input_ids[:, 3:17], case.source_index[:, 3:17]
    out = inject_embeddings(ids, case.weight, sources, index)
    assert torch.equal(out, inject_embeddings_reference(ids, case.weight, sources, index))
    weight = case.weight[:, ::2]  # non-contiguous
    out = inject_embeddings(ids, weight, sources[:, :20], index)
    assert torch.equal(out, inject_embeddings_reference(ids, weight, sources[:, :20], index))


def test_gradcheck_float64(use_ext):
    case = make_case(B=2, T=6, V=5, D=3, N=4, injected=0.4, dtype=torch.float64, device="cuda", seed=3,
                     reuse_sources=True)
    weight = case.weight.clone().requires_grad_(True)
    sources = case.sources.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w, s: inject_embeddings(case.input_ids, w, s, case.source_index), (weight, sources))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_deterministic_bitwise(use_ext, monkeypatch, dtype):
    monkeypatch.setenv("MMCOCONUT_DETERMINISTIC", "1")
    case = make_case(B=16, T=512, V=7, D=130, N=512, injected=0.2, dtype=dtype, device="cuda", seed=4,
                     reuse_sources=True)
    first, second = run_op(inject_embeddings, case), run_op(inject_embeddings, case)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    monkeypatch.delenv("MMCOCONUT_DETERMINISTIC")
    atomic = run_op(inject_embeddings, case)  # atomic path: same values up to summation order
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a, b)


def test_out_of_range_debug_mode_and_no_sync(use_ext, monkeypatch):
    """Without debug mode an out-of-range row is a zero row (no device->host read); debug mode raises IndexError."""
    c = make_case(B=2, T=6, V=5, D=4, N=3, injected=0.4, device="cuda", seed=7)
    bad_id = c.input_ids.clone()
    bad_id[c.source_index < 0] = 5
    monkeypatch.setattr(K, "_DEBUG", True)
    with pytest.raises(IndexError):
        inject_embeddings(bad_id, c.weight, c.sources, c.source_index)
    bad_index = c.source_index.clone()
    bad_index[0, 0] = 3
    with pytest.raises(IndexError):
        inject_embeddings(c.input_ids, c.weight, c.sources, bad_index)
    monkeypatch.setattr(K, "_DEBUG", False)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        out = inject_embeddings(bad_id, c.weight, c.sources, c.source_index)
        w = c.weight.clone().requires_grad_(True)
        s = c.sources.clone().requires_grad_(True)
        inject_embeddings(c.input_ids, w, s, c.source_index).backward(c.grad_out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (out[c.source_index < 0] == 0).all()
    torch.cuda.synchronize()  # the context is still usable (no device-side assert)
    assert inject_embeddings(c.input_ids, c.weight, c.sources, c.source_index).shape == (2, 6, 4)


def test_cuda_op_itself_raises_out_of_range_in_debug_mode(use_ext, monkeypatch):
    """Debug mode reaches into the CUDA op: its kernel records the first out-of-range row and the op raises
    IndexError with the CPU op's message, even without the host-side pre-check; without it, a zero row."""
    from mmcoconut.kernels.build import load_extension
    ext = load_extension("cuda")
    c = make_case(B=2, T=6, V=5, D=4, N=3, injected=0.4, device="cuda", seed=7)
    bad_index = c.source_index.clone()
    bad_index[1, 2] = 3
    with pytest.raises(IndexError, match=r"out-of-range index at flat position 8 \(.*source_index=3, V=5, N=3\)"):
        ext.forward(c.input_ids, c.weight, c.sources, bad_index, True)
    bad_id = c.input_ids.masked_fill(c.source_index < 0, 7)
    with pytest.raises(IndexError, match=r"input_id=7"):
        ext.forward(bad_id, c.weight, c.sources, c.source_index, True)
    monkeypatch.setattr(K, "check_index_range", lambda *a: None)  # only the kernel checks now
    monkeypatch.setattr(K, "_DEBUG", True)
    with pytest.raises(IndexError, match="out-of-range index"):
        inject_embeddings(c.input_ids, c.weight, c.sources, bad_index)
    monkeypatch.setattr(K, "_DEBUG", False)
    assert (ext.forward(c.input_ids, c.weight, c.sources, bad_index, False)[1, 2] == 0).all()
    cpu = [t.cpu() for t in (c.input_ids, c.weight, c.sources, bad_index)]
    with pytest.raises(IndexError, match=r"out-of-range index at flat position 8 \(.*source_index=3, V=5, N=3\)"):
        load_extension("cpu").forward(*cpu)  # the same message on CPU
