"""Evaluation against the full expected set, compared with the official A-OKVQA scorer on the same predictions
file: full shards, a truncated shard, a deleted shard, overlong samples, a --max-samples subset, an annotation
file, shards without questions.jsonl.

`official_scores` re-derives allenai/aokvqa evaluation/eval_predictions.py (its __main__ with strict=False): the
dataset is every question of the annotation file; DA keeps questions whose difficult_direct_answer is False; a
question without a prediction scores 0; MC / DA are scored only when some prediction has that key.
"""
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch

from mmcoconut.data import synthetic
from mmcoconut.data.sharding import write_shards
from mmcoconut.data.sources import SyntheticImage, WorkItem
from mmcoconut.eval.evaluate import evaluate
from mmcoconut.eval.expected import expected_set

N = 14


def official_scores(dataset: list, predictions: dict) -> dict:
    def eval_aokvqa(ds, preds, multiple_choice):
        ds = {d["question_id"]: d for d in ds}
        if multiple_choice is False:
            ds = {k: v for k, v in ds.items() if v["difficult_direct_answer"] is False}
        acc = []
        for q in ds:
            if q not in preds:
                acc.append(0.0)
                continue
            if multiple_choice:
                acc.append(float(preds[q] == ds[q]["choices"][ds[q]["correct_choice_idx"]]))
            else:
                acc.append(min(1.0, sum(preds[q] == da for da in ds[q]["direct_answers"]) / 3.0))
        return sum(acc) / len(acc) * 100

    out = {}
    for name, key, mc in (("mc", "multiple_choice", True), ("da", "direct_answer", False)):
        per_mode = {q: p[key] for q, p in predictions.items() if key in p}
        out[name] = eval_aokvqa(dataset, per_mode, mc) if per_mode else None
    return out


def official_records(n: int = N) -> list:
    """Synthetic records with A-OKVQA-like answers: varied direct answers, some questions difficult."""
    recs = []
    for i in range(n):
        r = synthetic.make_record(i, seed=5)
        others = [c for c in r["choices"] if c != r["answer"]]
        r["direct_answers"] = [r["answer"]] * (i % 5) + [others[i % 3]] * (10 - i % 5)
        r["difficult_direct_answer"] = i % 4 == 2
        recs.append(r)
    return recs


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """N records in shards of 4 (4, 4, 4, 2) + the official annotation file of the same questions."""
    out = tmp_path_factory.mktemp("expected")
    items = [WorkItem(r["question_id"], r, SyntheticImage(r["scene"])) for r in official_records()]
    summary = write_shards(items, out / "shards", "val", maxcount=4, image_size=32, progress=False)
    assert summary["written"] == N and summary["shards"] == 4
    ann = out / "aokvqa_v1p0_val.json"
    ann.write_text(json.dumps(official_records()))
    return out


@pytest.fixture(scope="module")
def tiny(eval_cfg_factory):
    from mmcoconut.factory import build_image_processor, build_model, build_tokenizer
    cfg = eval_cfg_factory({"eval.batch_size": 3})
    torch.manual_seed(0)
    tok = build_tokenizer(cfg.model)
    return build_model(cfg.model, tok).eval(), tok, build_image_processor(cfg.model), cfg


def scripted_generate(tok):
    """Replace model.generate: the answer of a row is a function of its prompt text (index 0-3, the choice
    text, a fuzzy text, or nothing), so the predictions are varied and identical in every scenario."""
    def generate(input_ids, attention_mask, pixel_values=None, position_ids=None, max_new_tokens=64,
                 dummy_latent=None):
        out = []
        for ids, m in zip(input_ids, attention_mask):
            text = tok.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
            h = zlib.crc32(text.encode())
            choices = text.split("The choices are ")[1].split("\n")[0].split(", ")
            answer = ["", f"### {h % 4}", f"### {choices[h % 4].split(': ')[1]}", "### xq"][h % 4 if h % 7 else 0]
            out.append(tok.encode(answer))
        return out
    return generate


def run_eval(tiny, shard_spec, out_dir, **kw):
    model, tok, improc, cfg = tiny
    model.generate = scripted_generate(tok)
    try:
        res = evaluate(model, tok, improc, cfg, shard_spec, ["nocot"], str(out_dir), verbose=False, **kw)["nocot"]
    finally:
        del model.generate
    preds = json.loads((Path(out_dir) / "predictions_nocot.json").read_text())
    return res, preds


def assert_official(res, preds, dataset, nontrivial=True):
    off = official_scores(dataset, preds)
    assert res["mc"] == pytest.approx(off["mc"], abs=1e-9) and res["da"] == pytest.approx(off["da"], abs=1e-9)
    if nontrivial:
        assert 0 < off["mc"] < 100 and 0 < off["da"] < 100


def test_full_set_equals_official(tiny, shards, tmp_path):
    res, preds = run_eval(tiny, str(shards / "shards" / "val"), tmp_path)
    assert res["n_expected"] == res["n_scored"] == N and res["n_missing"] == 0 and len(preds) == N
    assert res["empty"] >= 1 and res["fallback"] >= 1  # the scripted answers cover both
    assert_official(res, preds, official_records())
    assert sum(p["multiple_choice"] == "" for p in preds.values()) == res["empty"]
    summary = json.loads((tmp_path / "eval_results.json").read_text())
    assert summary["views"]["nocot"]["n_expected"] == N


def truncate_last_shard(src: Path, dst: Path, keep_samples: int) -> None:
    """Copy the shard dir and cut val-000003.tar after `keep_samples` whole samples (sizes.json unchanged)."""
    import tarfile
    shutil.copytree(src, dst)
    tar = dst / "val-000003.tar"
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    end = members[2 * keep_samples].offset  # jpg + json per sample
    tar.write_bytes(tar.read_bytes()[:end + 100])  # a cut inside the next sample's first header


def test_truncated_shard_counts_missing_as_zero(tiny, shards, tmp_path):
    truncate_last_shard(shards / "shards", tmp_path / "trunc", keep_samples=1)
    res, preds = run_eval(tiny, str(tmp_path / "trunc" / "val"), tmp_path / "eval")
    assert res["n_expected"] == N and res["n_scored"] == N - 1 and res["n_missing"] == 1
    assert res["missing"] == {"unreadable": 1} and len(preds) == N - 1
    recs = official_records()
    assert_official(res, preds, recs)
    # the same with the annotation file: the expected set is its questions, the lost one scores 0
    res2, preds2 = run_eval(tiny, str(tmp_path / "trunc" / "val"), tmp_path / "eval2",
                            annotations=str(shards / "aokvqa_v1p0_val.json"))
    assert preds2 == preds and res2["n_expected"] == N and res2["missing"] == {"not in the shards": 1}
    assert_official(res2, preds2, recs)


def test_deleted_shard_and_overlong_samples(tiny, shards, tmp_path, eval_cfg_factory):
    shutil.copytree(shards / "shards", tmp_path / "s")
    (tmp_path / "s" / "val-000001.tar").unlink()  # 4 questions (indices 4-7, one difficult); in sizes.json
    exp = expected_set(str(tmp_path / "s" / "val"))
    assert exp.n_expected == N and len(exp.unknown) == 4 and "missing shard" in exp.unknown[0][1]
    assert [u[2]["question_id"] for u in exp.unknown] == [synthetic.record_key(i, 5) for i in range(4, 8)]
    recs = official_records()
    # questions.jsonl names the lost questions and their DA status: the official figures without annotations
    res, preds = run_eval(tiny, str(tmp_path / "s" / "val"), tmp_path / "e")
    assert res["missing"] == {"missing shard": 4} and len(preds) == N - 4 and res.get("note") is None
    assert_official(res, preds, recs)
    # and with the annotation file
    res, preds = run_eval(tiny, str(tmp_path / "s" / "val"), tmp_path / "e2",
                          annotations=str(shards / "aokvqa_v1p0_val.json"))
    assert res["missing"] == {"not in the shards": 4} and len(preds) == N - 4
    assert_official(res, preds, recs)
    # without questions.jsonl the lost questions count in DA too (difficulty unknown): MC stays official, a note
    (tmp_path / "s" / "questions.jsonl").unlink()
    res, preds = run_eval(tiny, str(tmp_path / "s" / "val"), tmp_path / "e3")
    off = official_scores(recs, preds)
    assert res["mc"] == pytest.approx(off["mc"]) and res["n_da"] == 12 and "DA counts 4 lost" in res["note"]
    # overlong prompts are skipped (data.overlong=skip) and scored 0 with their reason
    model, tok, improc, _ = tiny
    lengths = {r["question_id"]: len(tok.encode(r["question"] + "\n")) for r in recs}
    limit = sorted(lengths.values())[N // 2] + model.n_image_tokens - 1
    cfg = eval_cfg_factory({"eval.batch_size": 3, "data.overlong": "skip", "model.max_length": limit})
    res3, preds3 = run_eval((model, tok, improc, cfg), str(shards / "shards" / "val"), tmp_path / "o")
    n_long = sum(v + model.n_image_tokens > limit for v in lengths.values())
    assert 0 < n_long < N and res3["missing"] == {"too_long": n_long} and res3["n_expected"] == N
    assert_official(res3, preds3, recs, nontrivial=False)


def test_max_samples_is_a_subset(tiny, shards, tmp_path):
    res, preds = run_eval(tiny, str(shards / "shards" / "val"), tmp_path, max_samples=6)
    assert res["subset"] == 6 and res["n_expected"] == res["n_scored"] == 6 and len(preds) == 6
    subset = official_records()[:6]  # positions 0-5: shard 0 and the first two of shard 1
    assert set(preds) == {r["question_id"] for r in subset}
    assert_official(res, preds, subset)
    # a truncated shard inside the subset: its lost positions stay in the subset's denominator
    truncate_last_shard(shards / "shards", tmp_path / "t", keep_samples=0)
    res2, preds2 = run_eval(tiny, str(tmp_path / "t" / "val"), tmp_path / "e2", max_samples=13)
    assert res2["n_expected"] == 13 and res2["missing"] == {"unreadable": 1} and len(preds2) == 12
    assert_official(res2, preds2, official_records()[:13])
