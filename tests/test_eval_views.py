"""Four-view evaluation (nocot / cot / coconut / dummy) on an untrained tiny model, 1 and 2 ranks."""
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from mmcoconut.eval.evaluate import VIEWS, evaluate
from mmcoconut.modeling.prompt import extract_answer

ROOT = Path(__file__).resolve().parents[1]


def shard_records(shards: str) -> dict:
    """question_id -> shard json, read straight from the tars."""
    out = {}
    for tar in sorted(Path(shards).glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    rec = json.loads(tf.extractfile(m).read())
                    out[str(rec["question_id"])] = rec
    return out


@pytest.fixture(scope="module")
def tiny(eval_cfg_factory):
    from mmcoconut.factory import build_image_processor, build_model, build_tokenizer
    cfg = eval_cfg_factory()
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model)
    model = build_model(cfg.model, tok).eval()
    return model, tok, build_image_processor(cfg.model), cfg


def test_extract_answer():
    assert extract_answer("The red circle is 1st.\n### 2") == "2"
    assert extract_answer("### 1\n### 3 ") == "3"
    assert extract_answer("no marker") == "no marker"


def check_predictions(path: Path, records: dict, generations: Path = None) -> dict:
    """Every shard question predicted once; a choice, or "" exactly where the generated answer is empty."""
    preds = json.loads(path.read_text())
    assert set(preds) == set(records), f"{path.name}: question ids differ from the shards"
    empty = set()
    if generations is not None:
        empty = {g["question_id"] for g in map(json.loads, generations.read_text().splitlines())
                 if not g["answer"].strip()}
    for qid, p in preds.items():
        assert set(p) == {"multiple_choice", "direct_answer"}
        if qid in empty:
            assert p == {"multiple_choice": "", "direct_answer": ""}
        else:
            assert p["multiple_choice"] in records[qid]["choices"] and isinstance(p["direct_answer"], str)
    return preds


def test_four_views(tiny, eval_shards, tmp_path):
    model, tok, improc, cfg = tiny
    records = shard_records(eval_shards)
    assert len(records) == 13
    # Record what generate() was asked for and how many all-zero input embeddings the LM saw, per view.
    seen = {"view": None, "dummy_arg": {}, "zero_rows": {}}
    orig_generate = model.generate

    def generate(*a, **kw):
        view = "dummy" if kw.get("dummy_latent") else "other"
        seen["view"] = view
        seen["dummy_arg"].setdefault(view, set()).add(kw.get("dummy_latent"))
        return orig_generate(*a, **kw)

    def hook(_mod, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if emb is None:
            emb = next((x for x in args if torch.is_tensor(x) and x.dim() == 3 and x.is_floating_point()), None)
        if emb is not None:
            zeros = int((emb.abs().sum(-1) == 0).sum())
            seen["zero_rows"][seen["view"]] = seen["zero_rows"].get(seen["view"], 0) + zeros

    model.generate = generate
    handle = model.lm.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        torch.manual_seed(0)
        res = evaluate(model, tok, improc, cfg, eval_shards, VIEWS, str(tmp_path), n_latents=2)
    finally:
        handle.remove()
        del model.generate
    assert list(res) == list(VIEWS)
    for view, r in res.items():
        assert r["n"] == r["n_expected"] == r["n_scored"] == 13 and r["n_missing"] == 0 and r["missing"] == {}
        assert 0 <= r["mc"] <= 100 and 0 <= r["da"] <= 100, (view, r)
        assert 0 <= r["fallback"] + r["empty"] <= 13 and r["samples_per_s"] > 0
        assert r["answer_len"] <= cfg.eval.max_new_tokens and r["subset"] is None
        gens = tmp_path / f"generations_{view}.jsonl"
        check_predictions(tmp_path / f"predictions_{view}.json", records, gens)
        lines = [json.loads(x) for x in gens.read_text().splitlines()]
        assert len(lines) == 13 and sum(not g["answer"].strip() for g in lines) == r["empty"]
    assert res["coconut"]["n_latents"] == 2 and res["nocot"]["n_latents"] == 0
    # dummy: the same prompts, latent inputs replaced by zeros; coconut feeds hidden states (never all-zero)
    assert seen["dummy_arg"] == {"other": {None}, "dummy": {"zeros"}}
    assert seen["zero_rows"].get("dummy", 0) >= 13 * 2, seen
    assert seen["zero_rows"].get("other", 0) == 0, seen
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["view"] for r in recs] == list(VIEWS) and all(r["kind"] == "eval" for r in recs)
    for r in recs:
        assert {"mc", "da", "answer_len", "samples_per_s", "n", "n_expected", "n_scored", "n_missing", "missing",
                "empty", "fallback", "subset"} <= set(r)
    summary = json.loads((tmp_path / "eval_results.json").read_text())
    assert set(summary["views"]) == set(VIEWS) and "dummy" in summary["table"]
    assert summary["latent_use_gap"]["mc"] == pytest.approx(res["coconut"]["mc"] - res["dummy"]["mc"])
    assert summary["expected"] == {"source": "shards", "n_expected": 13, "subset": None}


def test_test_split_skips_metrics(tiny, eval_shards, tmp_path, monkeypatch):
    """No correct_choice_idx / direct_answers (test split): predictions written, metrics None with a note."""
    import mmcoconut.eval.evaluate as ev
    model, tok, improc, cfg = tiny
    orig = ev.generate_view

    def strip_answers(*a, **kw):
        rows, secs = orig(*a, **kw)
        for r in rows:
            r["meta"] = {k: v for k, v in r["meta"].items() if k not in ("correct_choice_idx", "direct_answers")}
        return rows, secs

    def strip_expected(*a):
        exp = orig_expected(*a)
        for q, rec in exp.records.items():
            exp.records[q] = {k: v for k, v in rec.items() if k not in ("correct_choice_idx", "direct_answers")}
        return exp

    orig_expected = ev.expected_set
    monkeypatch.setattr(ev, "generate_view", strip_answers)
    monkeypatch.setattr(ev, "expected_set", strip_expected)
    res = ev.evaluate(model, tok, improc, cfg, eval_shards, ["nocot"], str(tmp_path), max_samples=4)
    assert res["nocot"]["mc"] is None and res["nocot"]["da"] is None and "note" in res["nocot"]
    assert len(json.loads((tmp_path / "predictions_nocot.json").read_text())) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiproc
def test_two_rank_eval_gathers_every_question_once(tiny, eval_shards, tmp_path):
    """2 ranks (torchrun, gloo) on 13 samples in uneven shards: 7 + 6 samples, padded batches; rank 0 writes."""
    from mmcoconut.export.hf_export import save_export
    model, tok, improc, cfg = tiny
    export = tmp_path / "export"
    save_export(model, tok, cfg, export, image_processor=improc)
    out = tmp_path / "eval"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "mmcoconut.eval", str(export), eval_shards, "--views", "nocot,dummy",
           "--out", str(out), "--eval.batch_size=3", "--eval.max_new_tokens=3"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    records = shard_records(eval_shards)
    for view in ("nocot", "dummy"):
        check_predictions(out / f"predictions_{view}.json", records, out / f"generations_{view}.jsonl")
        qids = [json.loads(x)["question_id"] for x in (out / f"generations_{view}.jsonl").read_text().splitlines()]
        assert sorted(qids) == sorted(records), view  # every question exactly once
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["view"], r["n"]) for r in recs] == [("nocot", 13), ("dummy", 13)]  # written once, by rank 0
    assert "nocot" in p.stdout and "dummy" in p.stdout


def test_per_sample_latent_counts_batched_equal_one_by_one(tiny_dirs, eval_cfg_factory, tmp_path):
    """Chain shards with 1-4 hops: the coconut view gives each prompt min(max_latent_stage, #steps, stage) *
    c_thought latents (Coconut, pad_latent_to_max false), and batches of 5 mixed counts generate exactly what
    batches of one do."""
    from conftest import build_tiny_mmcoconut
    from mmcoconut.factory import build_image_processor
    sys.path.insert(0, str(ROOT / "tools"))
    import make_shards
    out = tmp_path / "chain"
    assert make_shards.main(["--synthetic", "9", "--task", "chain", "--hops", "1-4", "--seed", "2", "--split", "val",
                             "--out", str(out), "--maxcount", "4", "--image-size", "32", "--workers", "1",
                             "--no-progress"]) == 0
    hops = {q: r["hops"] for q, r in shard_records(str(out)).items()}
    assert len(set(hops.values())) >= 3
    cfg = eval_cfg_factory({"curriculum.max_latent_stage": 3, "curriculum.c_thought": 2,
                            "curriculum.pad_latent_to_max": False, "eval.max_new_tokens": 6})
    model, tok = build_tiny_mmcoconut(tiny_dirs, "patches")
    improc = build_image_processor(cfg.model)
    gens = {}
    for stage in (2, 3):
        for bs in (5, 1):
            d = tmp_path / f"s{stage}b{bs}"
            res = evaluate(model, tok, improc, cfg, str(out / "val"), ["coconut", "dummy"], str(d), stage=stage,
                           batch_size=bs, verbose=False)
            assert res["coconut"]["n_scored"] == 9
            for view in ("coconut", "dummy"):
                gens[stage, bs, view] = {g["question_id"]: (g["text"], g["n_latents"]) for g in
                                         map(json.loads, (d / f"generations_{view}.jsonl").read_text().splitlines())}
        for view in ("coconut", "dummy"):
            assert gens[stage, 5, view] == gens[stage, 1, view], (stage, view)
            assert {q: n for q, (_, n) in gens[stage, 5, view].items()} == \
                {q: min(3, h, stage) * 2 for q, h in hops.items()}
    assert len({t for t, _ in gens[3, 5, "coconut"].values()}) > 1  # non-degenerate generations
