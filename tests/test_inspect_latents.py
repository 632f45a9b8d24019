"""tools/inspect_latents.py: continuous thoughts decoded through the LM head and compared with the replaced steps."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import inspect_latents  # noqa: E402


@pytest.fixture(scope="module")
def export(tiny_dirs, eval_cfg_factory, tmp_path_factory):
    from conftest import build_tiny_mmcoconut
    from mmcoconut.factory import build_image_processor
    from mmcoconut.export.hf_export import save_export
    cfg = eval_cfg_factory({"curriculum.c_thought": 2, "curriculum.max_latent_stage": 2})
    model, tok = build_tiny_mmcoconut(tiny_dirs, "patches")
    out = tmp_path_factory.mktemp("inspect") / "export"
    save_export(model, tok, cfg, out, image_processor=build_image_processor(cfg.model))
    return out, model, tok, cfg


def test_thoughts_table_heatmap_and_reference(export, eval_shards, tmp_path, capsys):
    path, model, tok, cfg = export
    assert inspect_latents.main([str(path), eval_shards, "--first", "3", "--topk", "4", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "latents.json").read_text())
    assert (tmp_path / "latents.png").stat().st_size > 1000 and data["stage"] == 2
    assert len(data["samples"]) == 3
    for s in data["samples"]:
        th = s["thoughts"]
        # 3-step samples at stage 2, c_thought 2: 4 thoughts, two per replaced step
        assert s["n_latents"] == 4 and [e["step"] for e in th] == [0, 0, 1, 1]
        assert s["key"] in printed and th[0]["step_text"] == s["steps"][0]
        for e in th:
            probs = [p for _, p in e["topk"]]
            assert len(probs) == 4 and probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
            assert len(e["cos"]) == len(e["step_tokens"]) == len(tok.encode(e["step_text"] + "\n"))
            assert all(-1.0001 <= c <= 1.0001 for c in e["cos"])
    # Reference: thought t is the input of latent column t, i.e. the uncached forward's last hidden state one
    # column before it; its LM-head distribution is naive_forward's logits there.
    from mmcoconut.factory import build_image_processor
    row = inspect_latents.read_rows(eval_shards, tok, build_image_processor(cfg.model), cfg, model.n_image_tokens,
                                    2, [data["samples"][0]["key"]], 0)[0]
    ids = torch.tensor([row["input_ids"]])
    l0 = int((ids[0] == model.ids.latent).nonzero()[0])
    with torch.no_grad():
        logits = model.naive_forward(ids, torch.ones_like(ids), pixel_values=row["pixel_values"][None]).logits[0]
    for e in data["samples"][0]["thoughts"]:
        ref = torch.softmax(logits[l0 + e["thought"] - 2], -1).topk(4)
        assert [tok.decode([int(i)]) for i in ref.indices] == [t for t, _ in e["topk"]]
        assert [float(v) for v in ref.values] == pytest.approx([p for _, p in e["topk"]], abs=1e-5)


def test_dummy_thoughts_differ_after_the_first(export, eval_shards, tmp_path):
    path, *_ = export
    assert inspect_latents.main([str(path), eval_shards, "--first", "1", "--out", str(tmp_path / "a")]) == 0
    assert inspect_latents.main([str(path), eval_shards, "--first", "1", "--dummy", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "latents.json").read_text())["samples"][0]["thoughts"] for d in "ab")
    assert a[0]["topk"] == b[0]["topk"]  # thought 1 = the hidden state over START, before any latent
    assert a[1:] != b[1:]
    assert inspect_latents.main([str(path), eval_shards, "--keys", "nope"]) == 2
