"""Fused embedding injection (mmcoconut.kernels): CPU extension vs the PyTorch reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmcoconut.kernels as K
from mmcoconut.kernels import inject_embeddings, inject_embeddings_reference
from mmcoconut.kernels.testing import CASES, DTYPES, assert_matches_reference, make_case, run_op

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture
def use_ext(monkeypatch):
    monkeypatch.setenv("MMCOCONUT_INJECT", "ext")
    monkeypatch.delenv("MMCOCONUT_DETERMINISTIC", raising=False)
    assert K.backend_for("cpu") == "ext"  # builds (or loads) the CPU extension once


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", list(CASES))
def test_ext_matches_reference(use_ext, name, dtype):
    case = make_case(**CASES[name], dtype=dtype, seed=hash(name) % 1000)
    assert_matches_reference(inject_embeddings, inject_embeddings_reference, case)


def test_non_contiguous_inputs(use_ext):
    big = make_case(B=3, T=20, V=30, D=40, N=12, injected=0.3, seed=1)
    ids, index = big.input_ids[:, 5:14], big.source_index[:, 5:14]  # KV-cached column slice
    weight_base = big.weight.clone().requires_grad_(True)
    weight = weight_base[:, :24]  # non-contiguous rows
    sources = big.sources[::2, :24]
    assert not (ids.is_contiguous() or weight.is_contiguous() or sources.is_contiguous())
    out = inject_embeddings(ids, weight, sources, index.clamp(max=5))
    ref = inject_embeddings_reference(ids, weight.detach(), sources, index.clamp(max=5))
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    (gw,) = torch.autograd.grad(out, weight_base, grad)
    ref_w = weight.detach().clone().requires_grad_(True)
    (ref_gw,) = torch.autograd.grad(inject_embeddings_reference(ids, ref_w, sources, index.clamp(max=5)),
                                    ref_w, grad)
    torch.testing.assert_close(gw[:, :24], ref_gw)
    assert gw[:, 24:].abs().sum() == 0


def test_partial_requires_grad(use_ext):
    case = make_case(B=2, T=10, V=8, D=6, N=5, injected=0.4, seed=2)
    weight = case.weight.clone().requires_grad_(True)
    out = inject_embeddings(case.input_ids, weight, case.sources, case.source_index)
    out.backward(case.grad_out)
    ref_w = case.weight.clone().requires_grad_(True)
    inject_embeddings_reference(case.input_ids, ref_w, case.sources, case.source_index).backward(case.grad_out)
    torch.testing.assert_close(weight.grad, ref_w.grad)


@pytest.mark.parametrize("backend", ["ext", "ref"])
def test_gradcheck_float64(monkeypatch, backend):
    monkeypatch.setenv("MMCOCONUT_INJECT", backend)
    case = make_case(B=2, T=6, V=5, D=3, N=4, injected=0.4, dtype=torch.float64, seed=3, reuse_sources=True)
    weight = case.weight.clone().requires_grad_(True)
    sources = case.sources.clone().requires_grad_(True)
    assert K.backend_for("cpu") == backend
    assert torch.autograd.gradcheck(
        lambda w, s: inject_embeddings(case.input_ids, w, s, case.source_index), (weight, sources))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_deterministic_bitwise(use_ext, monkeypatch, dtype):
    monkeypatch.setenv("MMCOCONUT_DETERMINISTIC", "1")
    case = make_case(B=8, T=64, V=5, D=33, N=64, injected=0.2, dtype=dtype, seed=4, reuse_sources=True)
    first, second = run_op(inject_embeddings, case), run_op(inject_embeddings, case)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_deterministic_switches(monkeypatch):
    monkeypatch.delenv("MMCOCONUT_DETERMINISTIC", raising=False)
    assert not K.deterministic_enabled()
    monkeypatch.setenv("MMCOCONUT_DETERMINISTIC", "1")
    assert K.deterministic_enabled()
    monkeypatch.delenv("MMCOCONUT_DETERMINISTIC")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert K.deterministic_enabled()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_dispatch_env(monkeypatch):
    monkeypatch.setenv("MMCOCONUT_INJECT", "ref")
    assert K.backend_for("cpu") == "ref"
    case = make_case(B=2, T=5, V=7, D=4, N=3, injected=0.4, seed=5)
    assert torch.equal(inject_embeddings(case.input_ids, case.weight, case.sources, case.source_index),
                       inject_embeddings_reference(case.input_ids, case.weight, case.sources, case.source_index))
    monkeypatch.setenv("MMCOCONUT_INJECT", "ext")
    assert K.backend_for("cpu") == "ext"
    monkeypatch.setenv("MMCOCONUT_INJECT", "auto")
    assert K.backend_for("cpu") == "ext"
    assert K.backend_for(torch.device("cpu")) == "ext"
    monkeypatch.setenv("MMCOCONUT_INJECT", "fast")
    with pytest.raises(ValueError, match="MMCOCONUT_INJECT"):
        K.backend_for("cpu")


FALLBACK = """
import warnings, torch
import mmcoconut.kernels as K
from mmcoconut.kernels.testing import make_case
case = make_case(B=2, T=5, V=7, D=4, N=3, injected=0.4, seed=6)
args = (case.input_ids, case.weight, case.sources, case.source_index)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [K.inject_embeddings(*args) for _ in range(3)]
ours = [str(w.message) for w in caught if "mmcoconut.kernels" in str(w.message)]
assert len(ours) == 1 and "simulated compiler failure" in ours[0], ours
assert all(torch.equal(o, K.inject_embeddings_reference(*args)) for o in outs)
import os
os.environ["MMCOCONUT_INJECT"] = "ext"
try:
    K.inject_embeddings(*args)
except RuntimeError as e:
    assert "simulated compiler failure" in str(e), e
    print("ok")
"""


def test_auto_falls_back_with_one_warning(tmp_path):
    """A compiler that fails (a fresh build dir, so the op must build): `auto` warns once and computes with the
    PyTorch implementation; `ext` raises the build error."""
    cxx = tmp_path / "failing-cxx"
    cxx.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'fake c++ 1.0' && exit 0\n"
                   "echo 'simulated compiler failure' >&2; exit 1\n")
    cxx.chmod(0o755)
    env = dict(os.environ, CXX=str(cxx), MMCOCONUT_EXT_DIR=str(tmp_path / "ext"), MMCOCONUT_INJECT="auto")
    res = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True, timeout=300, env=env,
                         cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("backend", ["ext", "ref"])
def test_clear_errors(monkeypatch, backend):
    monkeypatch.setenv("MMCOCONUT_INJECT", backend)
    c = make_case(B=2, T=6, V=5, D=4, N=3, injected=0.4, seed=7)
    op = inject_embeddings
    with pytest.raises(ValueError, match="int64"):
        op(c.input_ids.int(), c.weight, c.sources, c.source_index)
    with pytest.raises(ValueError, match="same D"):
        op(c.input_ids, c.weight, c.sources[:, :3], c.source_index)
    with pytest.raises(ValueError, match="dtype"):
        op(c.input_ids, c.weight, c.sources.half(), c.source_index)
    with pytest.raises(ValueError, match="equal shape"):
        op(c.input_ids, c.weight, c.sources, c.source_index[:, :3])
    bad_id = c.input_ids.clone()
    bad_id[c.source_index < 0] = 5  # == V at a token position
    with pytest.raises(IndexError):
        op(bad_id, c.weight, c.sources, c.source_index)
    bad_id[c.source_index < 0] = -1
    with pytest.raises(IndexError):
        op(bad_id, c.weight, c.sources, c.source_index)
    bad_index = c.source_index.clone()
    bad_index[0, 0] = 3  # == N
    with pytest.raises(IndexError):
        op(c.input_ids, c.weight, c.sources, bad_index)


def test_import_compiles_nothing(tmp_path):
    """Importing the op (and the model that uses it) loads no extension and writes nothing to the build cache."""
    code = ("import sys, mmcoconut.kernels, mmcoconut.factory; "
            "assert not [m for m in sys.modules if m.startswith('mmcoconut_inject')]; print('ok')")
    env = dict(os.environ, MMCOCONUT_EXT_DIR=str(tmp_path / "ext"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").iterdir())


@pytest.mark.parametrize("backend", ["ext", "ref"])
def test_registered_custom_op(monkeypatch, backend):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration, no data-dependent ops."""
    monkeypatch.setenv("MMCOCONUT_INJECT", backend)
    c = make_case(B=2, T=7, V=9, D=5, N=4, injected=0.4, seed=8)
    args = (c.input_ids, c.weight.clone().requires_grad_(True), c.sources.clone().requires_grad_(True),
            c.source_index)
    torch.library.opcheck(torch.ops.mmcoconut.inject_embeddings, args)
    torch.library.opcheck(torch.ops.mmcoconut.inject_embeddings_backward,
                          (c.grad_out, c.input_ids, c.source_index, 9, 4, True, True))


def test_index_checks_only_in_debug_mode(monkeypatch):
    """The range check reads device data: it runs in debug mode only (the CPU paths raise anyway)."""
    calls = []
    monkeypatch.setattr(K, "check_index_range", lambda *a: calls.append(a))
    c = make_case(B=2, T=5, V=7, D=4, N=3, injected=0.4, seed=9)
    monkeypatch.setattr(K, "_DEBUG", False)
    inject_embeddings(c.input_ids, c.weight, c.sources, c.source_index)
    assert calls == []
    K.set_debug(True)
    try:
        assert K.debug_enabled()
        inject_embeddings(c.input_ids, c.weight, c.sources, c.source_index)
    finally:
        K.set_debug(False)
    assert len(calls) == 1
