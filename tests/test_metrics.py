"""Official A-OKVQA metric semantics and answer-to-choice mapping, on hand-computed examples."""

import json

import pytest

from mmcoconut.modeling.choices import map_to_choice
from mmcoconut.eval.scoring import predictions_from_generations
from mmcoconut.eval.metrics import (eval_aokvqa, evaluate_predictions, load_predictions, main,
                                    save_predictions)

CHOICES = ["cat", "dog", "horse", "cow"]


def rec(qid, correct, das, difficult=False, choices=CHOICES):
    return {"question_id": qid, "choices": list(choices), "correct_choice_idx": correct,
            "direct_answers": list(das), "difficult_direct_answer": difficult}


def da_list(n_match, word="horse", other="pony"):
    return [word] * n_match + [other] * (10 - n_match)


@pytest.fixture
def dataset():
    return [
        rec("q1", 2, da_list(2)),                     # DA: 2 matches -> 2/3
        rec("q2", 2, da_list(3)),                     # 3 -> 1
        rec("q3", 2, da_list(4)),                     # 4 -> 1 (capped)
        rec("q4", 2, da_list(0)),                     # 0 -> 0
        rec("q5", 1, da_list(10, "dog"), difficult=True),   # dropped from DA, kept for MC
    ]


def both(x):
    return {"multiple_choice": x, "direct_answer": x}


def test_da_matches_and_difficult_dropped(dataset):
    preds = {q: both("horse") for q in ("q1", "q2", "q3", "q4")} | {"q5": both("dog")}
    da = eval_aokvqa(dataset, preds, multiple_choice=False)
    assert da == pytest.approx((2 / 3 + 1 + 1 + 0) / 4 * 100)
    res = evaluate_predictions(dataset, preds)
    assert res["n_da"] == 4 and res["n_mc"] == 5
    assert res["da"] == pytest.approx(da)
    assert res["mc"] == pytest.approx(100.0)      # difficult q5 counts for MC
    assert "note" not in res


def test_mc_exact_equality_case_matters(dataset):
    preds = {"q1": both("horse"), "q2": both("Horse"), "q3": both("horse "), "q4": both("cow"), "q5": both("dog")}
    assert eval_aokvqa(dataset, preds, multiple_choice=True) == pytest.approx(2 / 5 * 100)


def test_missing_predictions_score_zero(dataset):
    preds = {"q1": both("horse"), "q2": {"direct_answer": "horse"}}   # q2 lacks an MC prediction
    assert eval_aokvqa(dataset, preds, multiple_choice=True) == pytest.approx(1 / 5 * 100)
    assert eval_aokvqa(dataset, preds, multiple_choice=False) == pytest.approx((2 / 3 + 1) / 4 * 100)
    # official per-mode form {qid: str} and dict-keyed dataset are accepted too
    ds = {r["question_id"]: r for r in dataset}
    assert eval_aokvqa(ds, {"q2": "horse", "q5": "dog"}, multiple_choice=True) == pytest.approx(40.0)


def test_strict_mode_errors(dataset):
    full = {q: both("horse") for q in ("q1", "q2", "q3", "q4", "q5")}
    assert eval_aokvqa(dataset, full, multiple_choice=True, strict=True) == pytest.approx(80.0)
    with pytest.raises(ValueError, match="no 'multiple_choice' prediction"):
        eval_aokvqa(dataset, {"q1": both("horse")}, multiple_choice=True, strict=True)
    with pytest.raises(ValueError, match="not one of its choices"):
        eval_aokvqa(dataset, full | {"q3": both("zebra")}, multiple_choice=True, strict=True)
    # DA strict only needs the non-difficult questions
    da_only = {q: both("horse") for q in ("q1", "q2", "q3", "q4")}
    eval_aokvqa(dataset, da_only, multiple_choice=False, strict=True)


def test_test_split_without_answers_gives_none():
    test = [{"question_id": "t1", "choices": CHOICES, "difficult_direct_answer": False}]
    res = evaluate_predictions(test, {"t1": both("cat")})
    assert res["mc"] is None and res["da"] is None and res["n_mc"] == 0 and "note" in res
    with pytest.raises(ValueError, match="no question can be scored"):
        eval_aokvqa(test, {}, multiple_choice=True)


def test_predictions_io_and_cli(tmp_path, dataset, capsys):
    p = tmp_path / "sub" / "preds.json"
    preds = {q: both("horse") for q in ("q1", "q2", "q3", "q4", "q5")}
    save_predictions(p, preds)
    assert load_predictions(p) == preds
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="bad.json"):
        load_predictions(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_predictions(tmp_path / "nope.json")
    ds = tmp_path / "aokvqa_v1p0_val.json"
    ds.write_text(json.dumps(dataset))
    assert main(["--dataset", str(ds), "--preds", str(p)]) == 0
    out = capsys.readouterr().out
    assert "MC: 80.00  (n=5)" in out and f"DA: {(2 / 3 + 2) / 4 * 100:.2f}  (n=4)" in out


# ---- choice mapping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("2", (2, False)),
    ("### 2", (2, False)),
    (" 2: horse", (2, False)),
    ("horse", (2, False)),
    ("HORSE ", (2, False)),               # case-insensitive / whitespace-normalised
    ("hors", (2, True)),                  # fuzzy fallback
    ("", (0, True)),
    ("7", (0, True)),                     # out of range -> text matching -> fallback (no similarity: lowest idx)
    ("9: dog", (1, True)),                # out-of-range first token -> fuzzy on text
])
def test_map_to_choice(text, expected):
    assert map_to_choice(text, CHOICES) == expected


def test_map_to_choice_numeric_choices_and_ties():
    assert map_to_choice("3 dogs", ["1 dog", "2 dogs", "3 dogs", "4 dogs"]) == (2, False)   # exact text wins
    assert map_to_choice("2", ["1", "2", "3", "4"]) == (2, False)                          # index before text
    assert map_to_choice("ab", ["ax", "bx", "cc"]) == (0, True)                             # tie -> lowest


def test_predictions_from_generations():
    recs = [{"question_id": "a", "choices": CHOICES}, {"question_id": "b", "choices": CHOICES}]
    preds, n_fb = predictions_from_generations(recs, ["1", "hors"])
    assert preds == {"a": both("dog"), "b": both("horse")} and n_fb == 1
    with pytest.raises(ValueError, match="2 records but 1 texts"):
        predictions_from_generations(recs, ["1"])
