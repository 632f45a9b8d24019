"""Shared helpers for the kernel tests (CPU and CUDA) and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Shapes every backend must get right (CPU and CUDA tests add their own on top).
CASES = {
    "odd_D13": dict(B=2, T=9, V=17, D=13, N=6, injected=0.4),
    "wide_D72": dict(B=3, T=32, V=64, D=72, N=40, injected=0.3),
    "no_injection": dict(B=2, T=8, V=10, D=16, N=4, injected=0.0),
    "n_zero": dict(B=2, T=8, V=10, D=16, N=0, injected=0.5),
    "all_injected": dict(B=2, T=8, V=10, D=16, N=16, injected=1.0),
    "repeated_ids": dict(B=4, T=64, V=3, D=24, N=8, injected=0.1),
    "reused_sources": dict(B=2, T=16, V=12, D=8, N=3, injected=0.5, reuse_sources=True),
    "empty_batch": dict(B=1, T=0, V=5, D=8, N=2, injected=0.5),
}

TOLERANCES = {  # (rtol, atol) of a backward sum against the fp32-accumulated reference cast to dtype
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@dataclass
class Case:
    input_ids: torch.Tensor
    weight: torch.Tensor
    sources: torch.Tensor
    source_index: torch.Tensor
    grad_out: torch.Tensor


def make_case(B: int, T: int, V: int, D: int, N: int, injected: float, dtype=torch.float32, device="cpu",
              seed: int = 0, reuse_sources: bool = False, garbage_id: int | None = 10**9) -> Case:
    """Random case; about `injected` of the positions take a source row (each row once unless reuse_sources).

    Token ids at injected positions are set to `garbage_id` (never read by the op) when given.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    index = torch.full((B, T), -1, dtype=torch.long)
    mask = torch.rand(B, T, generator=g) < injected
    n_inj = int(mask.sum())
    if N == 0 or n_inj == 0:
        mask[:] = False
    elif reuse_sources:
        index[mask] = torch.randint(0, N, (n_inj,), generator=g)
    else:
        keep = mask.flatten().nonzero().squeeze(1)[:N]
        mask = torch.zeros(B * T, dtype=torch.bool)
        mask[keep] = True
        mask = mask.view(B, T)
        index[mask] = torch.randperm(N, generator=g)[: len(keep)]
    if garbage_id is not None:
        ids[mask] = garbage_id
    index[~mask] = torch.randint(-3, 0, (int((~mask).sum()),), generator=g)  # any negative = token
    weight = torch.randn(V, D, generator=g, dtype=torch.float64).to(dtype)
    sources = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(B, T, D, generator=g, dtype=torch.float64).to(dtype)
    return Case(*(t.to(device) for t in (ids, weight, sources, index, grad_out)))


def run_op(op, case: Case, upcast: torch.dtype | None = None):
    """(out, grad_weight, grad_sources) of `op`; with `upcast` the op runs in that dtype and results are
    cast back to the case dtype (an accurately rounded reference for low-precision checks)."""
    dtype = case.weight.dtype
    cast = (lambda t: t.to(upcast)) if upcast else (lambda t: t)
    weight = cast(case.weight).detach().requires_grad_(True)
    sources = cast(case.sources).detach().requires_grad_(True)
    out = op(case.input_ids, weight, sources, case.source_index)
    grad_weight, grad_sources = torch.autograd.grad(out, (weight, sources), cast(case.grad_out),
                                                    allow_unused=True)
    if grad_sources is None:  # reference with N == 0 may leave sources unused
        grad_sources = torch.zeros_like(sources)
    return tuple(t.detach().to(dtype) for t in (out, grad_weight, grad_sources))


def assert_matches_reference(op, ref_op, case: Case) -> None:
    """Forward bitwise equal; backward close to the fp32 (fp64 for fp64) reference rounded to dtype."""
    dtype = case.weight.dtype
    out, gw, gs = run_op(op, case)
    upcast = torch.float64 if dtype == torch.float64 else torch.float32
    ref_out, ref_gw, ref_gs = run_op(ref_op, case, upcast=upcast)
    assert out.dtype == dtype and out.shape == (*case.input_ids.shape, case.weight.shape[1])
    assert torch.equal(out, ref_out), "forward differs from reference"
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(gw, ref_gw, rtol=rtol, atol=atol, msg=lambda m: f"grad_weight: {m}")
    torch.testing.assert_close(gs, ref_gs, rtol=rtol, atol=atol, msg=lambda m: f"grad_sources: {m}")
