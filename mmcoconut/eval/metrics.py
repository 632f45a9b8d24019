"""A-OKVQA metrics with the semantics of the official ``allenai/aokvqa`` evaluation
(``evaluation/eval_predictions.py``, function ``eval_aokvqa``, after the fix of issue #2).

- Multiple choice (MC): every question is scored, ``float(pred == choices[correct_choice_idx])``
  (exact, case-sensitive string equality); mean x 100.
- Direct answer (DA): questions with ``difficult_direct_answer`` true are dropped; each remaining one scores
  ``min(1, #exact matches of pred among the 10 direct_answers / 3)``; mean x 100.
- Non-strict (default here): a question without a prediction scores 0. Strict (the official default): every
  question must have a prediction and, for MC, the prediction must be one of the choices (ValueError otherwise,
  where the official code asserts).

Predictions use the official file format ``{question_id: {"multiple_choice": str, "direct_answer": str}}``;
``eval_aokvqa`` also accepts the official per-mode form ``{question_id: str}``.
Questions without answers (test split: no ``correct_choice_idx`` / ``direct_answers``) are not scorable:
``evaluate_predictions`` then returns ``None`` metrics with a note instead of failing.

CLI: ``python -m mmcoconut.eval.metrics --dataset aokvqa_v1p0_val.json --preds preds.json [--strict]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable, Mapping

MC_KEY = "multiple_choice"
DA_KEY = "direct_answer"


def _as_dict(dataset: Iterable[Mapping] | Mapping[str, Mapping]) -> dict[str, Mapping]:
    """Official records as ``{question_id: record}`` (a list is keyed by its ``question_id`` fields)."""
    if isinstance(dataset, Mapping):
        return {str(q): rec for q, rec in dataset.items()}
    out = {}
    for i, rec in enumerate(dataset):
        if not isinstance(rec, Mapping) or "question_id" not in rec:
            raise ValueError(f"dataset record {i} is not an object with a 'question_id'")
        out[str(rec["question_id"])] = rec
    return out


def _has_mc_answer(rec: Mapping) -> bool:
    return rec.get("correct_choice_idx") is not None and bool(rec.get("choices"))


def _has_da_answer(rec: Mapping) -> bool:
    return bool(rec.get("direct_answers"))


def _is_difficult(rec: Mapping) -> bool:
    # Official: kept for DA only when `difficult_direct_answer is False`; a missing flag counts as not difficult.
    return bool(rec.get("difficult_direct_answer", False))


def _pred_text(pred: Any, key: str) -> Any:
    """The prediction for one mode: official per-question dict -> its ``key`` entry, a plain value as is."""
    if isinstance(pred, Mapping):
        return pred.get(key)
    return pred


def scorable(dataset, multiple_choice: bool) -> dict[str, Mapping]:
    """The questions one mode scores: MC -> all with an answer; DA -> non-difficult ones with direct answers."""
    ds = _as_dict(dataset)
    if multiple_choice:
        return {q: r for q, r in ds.items() if _has_mc_answer(r)}
    return {q: r for q, r in ds.items() if not _is_difficult(r) and _has_da_answer(r)}


def score_mc(pred: Any, rec: Mapping) -> float:
    return float(pred == rec["choices"][rec["correct_choice_idx"]])


def score_da(pred: Any, rec: Mapping) -> float:
    n_match = sum(pred == da for da in rec["direct_answers"])
    return min(1.0, n_match / 3.0)


def eval_aokvqa(dataset, preds: Mapping[str, Any], multiple_choice: bool, strict: bool = False) -> float:
    """Accuracy (0-100) of ``preds`` on ``dataset`` in one mode (see module docstring).

    Raises ValueError when no question of ``dataset`` can be scored in this mode, or, with ``strict``,
    when a prediction is missing or (MC) not one of the question's choices.
    """
    key = MC_KEY if multiple_choice else DA_KEY
    ds = scorable(dataset, multiple_choice)
    if not ds:
        raise ValueError(f"no question can be scored in the {'MC' if multiple_choice else 'DA'} setting "
                         "(no answers in the dataset, e.g. the test split, or all questions are difficult)")
    # Per-mode predictions; a per-question dict without this mode's key counts as missing.
    mode_preds = {str(q): _pred_text(p, key) for q, p in preds.items()}
    mode_preds = {q: p for q, p in mode_preds.items() if p is not None}
    if strict:
        missing = [q for q in ds if q not in mode_preds]
        if missing:
            raise ValueError(f"strict: {len(missing)} of {len(ds)} questions have no '{key}' prediction "
                             f"(e.g. {missing[:3]})")
    acc = []
    for q, rec in ds.items():
        if q not in mode_preds:
            acc.append(0.0)
            continue
        pred = mode_preds[q]
        if multiple_choice:
            if strict and pred not in rec["choices"]:
                raise ValueError(f"strict: MC prediction {pred!r} for question {q} is not one of its choices "
                                 f"{list(rec['choices'])}")
            acc.append(score_mc(pred, rec))
        else:
            acc.append(score_da(pred, rec))
    return sum(acc) / len(acc) * 100


def evaluate_predictions(dataset, preds: Mapping[str, Any], strict: bool = False) -> dict:
    """MC and DA accuracy: ``{"mc", "da", "n_mc", "n_da"}`` (+ ``"note"`` when a metric is not computable).

    ``n_mc`` / ``n_da`` count the questions scored in each mode; a metric is None when that count is 0.
    """
    ds = _as_dict(dataset)
    out: dict[str, Any] = {"mc": None, "da": None, "n_mc": 0, "n_da": 0}
    notes = []
    for mode, mc in (("mc", True), ("da", False)):
        n = len(scorable(ds, mc))
        out[f"n_{mode}"] = n
        if n == 0:
            notes.append(f"{mode.upper()} not computed: no scorable question (no answers, e.g. the test split"
                         + (")" if mc else ", or all difficult_direct_answer)"))
            continue
        out[mode] = eval_aokvqa(ds, preds, multiple_choice=mc, strict=strict)
    if notes:
        out["note"] = "; ".join(notes)
    return out


def load_predictions(path: str | os.PathLike) -> dict:
    """Read an official-format predictions json; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            preds = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"predictions file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(preds, dict):
        raise ValueError(f"{path}: predictions must be a JSON object {{question_id: {{...}}}}, "
                         f"got {type(preds).__name__}")
    return preds


def save_predictions(path: str | os.PathLike, preds: Mapping) -> None:
    """Write predictions as json (parent directories created); errors name the file."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(dict(preds), f, indent=1, ensure_ascii=False)
    except (OSError, TypeError) as e:
        raise OSError(f"cannot write predictions to {path}: {e}") from e


def load_dataset_file(path: str | os.PathLike) -> list | dict:
    """An official annotation json (list of records) or a JSON-lines file of records; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset file not found: {path}") from None
    if str(path).endswith(".jsonl"):
        recs = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: invalid JSON: {e.msg}") from None
        return recs
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(data, (list, dict)):
        raise ValueError(f"{path}: expected a list of records or a {{question_id: record}} object")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mmcoconut.eval.metrics",
                                description="A-OKVQA MC/DA accuracy (official semantics).")
    p.add_argument("--dataset", required=True, help="official annotation json (e.g. aokvqa_v1p0_val.json) or .jsonl")
    p.add_argument("--preds", required=True, help='json {question_id: {"multiple_choice": .., "direct_answer": ..}}')
    p.add_argument("--strict", action="store_true", help="require every prediction (and valid MC choices)")
    p.add_argument("--json", action="store_true", help="print the result dict as JSON")
    args = p.parse_args(argv)
    try:
        res = evaluate_predictions(load_dataset_file(args.dataset), load_predictions(args.preds), strict=args.strict)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(res))
        return 0
    for mode in ("mc", "da"):
        val = res[mode]
        shown = "n/a" if val is None else f"{val:.2f}"
        print(f"{mode.upper()}: {shown}  (n={res['n_' + mode]})")
    if "note" in res:
        print(f"note: {res['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
